"""The stack's MQTT broker: Mosquitto's config, accounts and ACL under ``data_dir/mosquitto``.

Owns rendering ``deploy/local/mosquitto/*.tmpl``, the password file (service accounts plus one
account per device), starting the broker with its plain and TLS listeners (the certificates come
from :mod:`vigil_tools.stack.tls`), binding each device account to its own client id (Mosquitto's
dynamic security plugin, written at start and changed through its ``$CONTROL`` topic while the
broker runs), and adding or revoking device credentials while it runs (Mosquitto re-reads its
password and ACL files on SIGHUP).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pwd
import re
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as paho_mqtt
from paho.mqtt.enums import CallbackAPIVersion

from vigil_tools.stack.credentials import (
    INGEST_MQTT_USER,
    SIM_MQTT_USER,
    StackSecrets,
    ensure_secrets,
    new_password,
)
from vigil_tools.stack.process import (
    Component,
    StackError,
    chown_tree,
    ensure_port_free,
    is_root,
    port_accepts,
    render_template,
    run_checked,
    running_pid,
    spawn,
    wait_until,
    write_file,
)
from vigil_tools.stack.settings import StackSettings
from vigil_tools.stack.tls import ensure_certificates, server_cert_file, server_key_file

log = logging.getLogger(__name__)

NAME: Final = "mosquitto"

# Device ids become MQTT usernames, ACL topic levels and password-file keys: no wildcards, no
# separators, nothing a shell or the password file's "user:hash" format would misread.
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RESERVED_PREFIX: Final = "vigil-"
_RELOAD_LINE: Final = b"Reloading config."
_RELOAD_TIMEOUT_S: Final = 5.0
# The stack's own account for the dynamic security plugin's $CONTROL topic (a reserved name: no
# device id may start with "vigil-"). It exists only in the plugin's file, not in passwd.
DYNSEC_ADMIN: Final = "vigil-stack-admin"
_DYNSEC_TOPIC: Final = "$CONTROL/dynamic-security/v1"
_DYNSEC_TIMEOUT_S: Final = 10.0


def conf_file(settings: StackSettings) -> Path:
    return settings.mosquitto_dir / "mosquitto.conf"


def passwd_file(settings: StackSettings) -> Path:
    return settings.mosquitto_dir / "passwd"


def acl_file(settings: StackSettings) -> Path:
    return settings.mosquitto_dir / "acl"


def dynsec_file(settings: StackSettings) -> Path:
    return settings.mosquitto_dir / "dynamic-security.json"


def dynsec_admin_file(settings: StackSettings) -> Path:
    return settings.mosquitto_dir / "dynsec-admin.secret"


def component(settings: StackSettings) -> Component:
    return Component(
        name=NAME,
        pid_file=settings.pids_dir / f"{NAME}.pid",
        log_file=settings.mosquitto_dir / "mosquitto.log",
        marker=str(conf_file(settings)),
        port=settings.mqtt_port,
    )


def run_as_user() -> str:
    """The user Mosquitto drops to when started as root (it refuses to keep running as root)."""
    if not is_root():
        return pwd.getpwuid(os.geteuid()).pw_name
    for candidate in ("mosquitto", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(candidate)
            return candidate
    raise StackError("running as root but neither a 'mosquitto' nor a 'nobody' user exists")


def render_conf(settings: StackSettings) -> str:
    """The broker configuration for ``settings`` (pure: reads only the template)."""
    return render_template(
        settings.deploy_dir / "mosquitto" / "mosquitto.conf.tmpl",
        {
            "port": settings.mqtt_port,
            "tls_port": settings.mqtt_tls_port,
            "tls_cert_file": server_cert_file(settings),
            "tls_key_file": server_key_file(settings),
            "run_as_user": run_as_user(),
            "password_file": passwd_file(settings),
            "acl_file": acl_file(settings),
            "dynsec_plugin": settings.mosquitto_dynsec_plugin,
            "dynsec_file": dynsec_file(settings),
            "persistence_location": settings.mosquitto_dir,
            "autosave_interval": settings.mqtt_autosave_interval,
            "autosave_on_changes": "true" if settings.mqtt_autosave_on_changes else "false",
            "log_file": component(settings).log_file,
        },
    )


def render_acl(settings: StackSettings) -> str:
    """The ACL file (pure: reads only the template)."""
    return render_template(
        settings.deploy_dir / "mosquitto" / "acl.tmpl",
        {"ingest_user": INGEST_MQTT_USER, "sim_user": SIM_MQTT_USER},
    )


@contextlib.contextmanager
def _passwd_lock(settings: StackSettings) -> Iterator[None]:
    # mosquitto_passwd rewrites the whole file; two writers at once would lose an account.
    settings.mosquitto_dir.mkdir(parents=True, exist_ok=True)
    with (settings.mosquitto_dir / ".passwd.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _set_password(settings: StackSettings, username: str, password: str) -> None:
    path = passwd_file(settings)
    if not path.exists():
        write_file(path, "", mode=0o600)
    # -b puts the password on mosquitto_passwd's argv for the few milliseconds it runs; acceptable
    # for a loopback-only development broker, and it keeps hashing in Mosquitto's own code.
    run_checked(
        [str(settings.mosquitto_passwd_bin), "-b", str(path), username, password],
        what=f"mosquitto_passwd for {username}",
        timeout_s=30.0,
    )
    _own_passwd(path)


def _own_passwd(path: Path) -> None:
    os.chmod(path, 0o600)
    if is_root():
        entry = pwd.getpwnam(run_as_user())
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _accounts(settings: StackSettings) -> list[str]:
    try:
        lines = passwd_file(settings).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [line.split(":", 1)[0] for line in lines if line.strip()]


def _has_account(settings: StackSettings, username: str) -> bool:
    return username in _accounts(settings)


def _dynsec_admin_password(settings: StackSettings) -> str:
    path = dynsec_admin_file(settings)
    if not path.exists():
        write_file(path, new_password() + "\n", mode=0o600)
    return path.read_text().strip()


def _dynsec_hash(password: str, salt: bytes) -> dict[str, Any]:
    # The plugin's own format: PBKDF2-SHA512, 101 iterations, salt and hash in base64.
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": 101,
    }


def render_dynsec(devices: list[str], admin_password: str) -> dict[str, Any]:
    """The dynamic security plugin's file: every device account bound to its own id as client
    id (no password there: the plugin defers to the password file), the stack's admin account,
    and a default ACL access of "deny", which defers every topic decision to acl_file."""
    deny = {"publishClientSend": False, "publishClientReceive": False}
    return {
        "defaultACLAccess": {**deny, "subscribe": False, "unsubscribe": False},
        "clients": [
            {
                "username": DYNSEC_ADMIN,
                "textname": "vigil stack administration",
                "roles": [{"rolename": "vigil-dynsec-admin"}],
                **_dynsec_hash(admin_password, os.urandom(12)),
            },
            *({"username": device, "clientid": device, "roles": []} for device in devices),
        ],
        "roles": [
            {
                "rolename": "vigil-dynsec-admin",
                "acls": [
                    {"acltype": kind, "topic": f"{_DYNSEC_TOPIC}/#", "allow": True}
                    for kind in ("publishClientSend", "publishClientReceive", "subscribePattern")
                ],
            }
        ],
        "groups": [],
    }


def _dynsec_active(settings: StackSettings) -> bool:
    """The running broker loaded the plugin: its configuration is written only when it starts,
    so the file on disk is the one it runs with (a broker started before the plugin was part
    of the configuration keeps passwords and ACL only, until `down` and `up`)."""
    if running_pid(component(settings)) is None:
        return False
    try:
        return "dynamic_security" in conf_file(settings).read_text()
    except FileNotFoundError:
        return False


def _dynsec_command(settings: StackSettings, command: dict[str, Any], tolerate: str) -> None:
    """Send one command to the running broker's plugin and wait for its answer; an error other
    than ``tolerate`` (e.g. "Client already exists") raises."""
    answer: list[dict[str, Any]] = []
    answered = threading.Event()
    client = paho_mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{DYNSEC_ADMIN}-{os.getpid()}-{threading.get_ident()}",
        protocol=paho_mqtt.MQTTv5,
    )
    client.username_pw_set(DYNSEC_ADMIN, _dynsec_admin_password(settings))
    subscribed = threading.Event()

    def on_subscribe(*_: object) -> None:
        subscribed.set()

    def on_message(_c: object, _u: object, message: paho_mqtt.MQTTMessage) -> None:
        answer.extend(json.loads(message.payload).get("responses", []))
        answered.set()

    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect("127.0.0.1", settings.mqtt_port, keepalive=30)
        client.loop_start()
        client.subscribe(f"{_DYNSEC_TOPIC}/response", qos=1)
        if not subscribed.wait(_DYNSEC_TIMEOUT_S):
            raise StackError("Mosquitto's dynamic security plugin: no SUBACK")
        client.publish(_DYNSEC_TOPIC, json.dumps({"commands": [command]}), qos=1)
        if not answered.wait(_DYNSEC_TIMEOUT_S):
            raise StackError(f"Mosquitto's dynamic security plugin did not answer {command}")
    except OSError as exc:
        raise StackError(f"cannot reach Mosquitto for {command['command']}: {exc}") from exc
    finally:
        client.disconnect()
        client.loop_stop()
    error = next((r.get("error") for r in answer if r.get("error")), None)
    if error is not None and error != tolerate:
        raise StackError(f"Mosquitto's dynamic security plugin refused {command}: {error}")


def _bind_client_id(settings: StackSettings, device_id: str) -> None:
    if _dynsec_active(settings):
        _dynsec_command(
            settings,
            {"command": "createClient", "username": device_id, "clientid": device_id},
            tolerate="Client already exists",
        )


def _unbind_client_id(settings: StackSettings, device_id: str) -> None:
    if _dynsec_active(settings):
        _dynsec_command(
            settings,
            {"command": "deleteClient", "username": device_id},
            tolerate="Client not found",
        )


def _write_config(settings: StackSettings, secrets: StackSecrets) -> None:
    if any(ch.isspace() for ch in str(settings.mosquitto_dir)):
        raise StackError(f"Mosquitto cannot use a data directory with spaces: {settings.data_dir}")
    settings.mosquitto_dir.mkdir(parents=True, exist_ok=True)
    write_file(conf_file(settings), render_conf(settings), mode=0o644)
    write_file(acl_file(settings), render_acl(settings), mode=0o644)
    ensure_certificates(settings, datetime.now(UTC))
    with _passwd_lock(settings):
        _set_password(settings, INGEST_MQTT_USER, secrets.mqtt_ingest_password)
        _set_password(settings, SIM_MQTT_USER, secrets.mqtt_sim_password)
        devices = [name for name in _accounts(settings) if not name.startswith(_RESERVED_PREFIX)]
    write_file(
        dynsec_file(settings),
        json.dumps(render_dynsec(devices, _dynsec_admin_password(settings)), indent=1) + "\n",
        mode=0o600,
    )
    # The broker opens its own log file after dropping privileges; create it first so it is ours
    # to hand over.
    component(settings).log_file.touch()
    chown_tree(settings.mosquitto_dir, run_as_user())


def start(settings: StackSettings) -> None:
    """Start the broker unless it runs; block until its listener accepts connections."""
    comp = component(settings)
    if running_pid(comp) is not None:
        if not port_accepts(settings.mqtt_tls_port):
            # Listeners are read only at start (SIGHUP does not add one), and restarting a broker
            # other clients are using is not `up`'s call to make.
            log.warning(
                "Mosquitto runs without a TLS listener on 127.0.0.1:%d (started with an older "
                "configuration); run `python -m vigil_tools.stack down` and `up` to add it",
                settings.mqtt_tls_port,
            )
        return
    ensure_port_free(settings.mqtt_port, "Mosquitto")
    ensure_port_free(settings.mqtt_tls_port, "Mosquitto (TLS)")
    _write_config(settings, ensure_secrets(settings))
    pid, offset = spawn(comp, [str(settings.mosquitto_bin), "-c", str(conf_file(settings))])
    wait_until(
        comp,
        lambda: port_accepts(settings.mqtt_port) and port_accepts(settings.mqtt_tls_port),
        timeout_s=settings.mqtt_start_timeout_s,
        what=(
            f"MQTT listeners on 127.0.0.1:{settings.mqtt_port} "
            f"and 127.0.0.1:{settings.mqtt_tls_port} (TLS)"
        ),
        pid=pid,
        log_offset=offset,
    )


def _reload(settings: StackSettings) -> None:
    """SIGHUP the broker and wait until it logged the reload (it is single-threaded, so by the
    time the line is written no client can be served with the old accounts)."""
    comp = component(settings)
    pid = running_pid(comp)
    if pid is None:
        return  # the next start reads the file anyway
    offset = _log_size(comp.log_file)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + _RELOAD_TIMEOUT_S
    while not _logged_since(comp.log_file, offset, _RELOAD_LINE):
        if time.monotonic() >= deadline:
            raise StackError(f"Mosquitto (pid {pid}) did not log a reload after SIGHUP")
        time.sleep(0.02)


def _log_size(log_file: Path) -> int:
    try:
        return log_file.stat().st_size
    except FileNotFoundError:
        return 0


def _logged_since(log_file: Path, offset: int, line: bytes) -> bool:
    try:
        with log_file.open("rb") as handle:
            handle.seek(offset)
            return line in handle.read()
    except FileNotFoundError:
        return False


def _check_device_id(device_id: str) -> None:
    if not _DEVICE_ID.fullmatch(device_id):
        raise ValueError(f"invalid device id {device_id!r}: use 1-64 of [A-Za-z0-9._-]")
    if device_id.startswith(_RESERVED_PREFIX):
        raise ValueError(f"device ids must not start with {_RESERVED_PREFIX!r}: {device_id!r}")


def _check_stack_exists(settings: StackSettings) -> None:
    # Writing a password file into a directory `up` has never prepared would leave a data dir
    # without the stack's marker, which `up` then refuses to adopt.
    if not settings.marker_file.exists():
        raise StackError(
            f"no local stack in {settings.data_dir}; run `python -m vigil_tools.stack up`"
        )


def add_device_credential(settings: StackSettings, device_id: str) -> str:
    """Create (or replace) the MQTT account of ``device_id``; returns its new password.

    The ACL pattern lets the account publish only under ``vigil/v1/dev/<device_id>/``. A running
    broker is reloaded before this returns, so the credential works immediately.
    """
    _check_device_id(device_id)
    _check_stack_exists(settings)
    password = new_password()
    with _passwd_lock(settings):
        _set_password(settings, device_id, password)
    # Bound before the password works: there is no moment in which this account could connect
    # with another client's id.
    _bind_client_id(settings, device_id)
    _reload(settings)
    return password


def rotate_device_credential(settings: StackSettings, device_id: str) -> str:
    """Replace the password of an existing device account; returns the new one.

    Unlike :func:`add_device_credential` it refuses a device that has no account, so a typo
    cannot mint a credential for a device nobody issued. The old password stops working when
    this returns (the broker is reloaded).
    """
    _check_device_id(device_id)
    _check_stack_exists(settings)
    password = new_password()
    with _passwd_lock(settings):
        if not _has_account(settings, device_id):
            raise StackError(f"device {device_id!r} has no MQTT account to rotate")
        _set_password(settings, device_id, password)
    _reload(settings)
    return password


def revoke_device_credential(settings: StackSettings, device_id: str) -> None:
    """Remove the MQTT account of ``device_id`` (no-op when absent) and reload the broker.

    Mosquitto re-checks connected clients on reload, so a connected device is dropped too.
    """
    _check_device_id(device_id)
    _check_stack_exists(settings)
    with _passwd_lock(settings):
        if not _has_account(settings, device_id):
            return
        path = passwd_file(settings)
        run_checked(
            [str(settings.mosquitto_passwd_bin), "-D", str(path), device_id],
            what=f"mosquitto_passwd -D {device_id}",
            timeout_s=30.0,
        )
        _own_passwd(path)
    _reload(settings)
    _unbind_client_id(settings, device_id)
