"""The care-team API's device accounts on a deployment's broker (services/api/adapters/dynsec.py),
against a real Mosquitto of the test's own configured as docker-compose.yml runs it: TLS only,
no anonymous clients, the service accounts in a password file, deploy/compose/acl, and the
dynamic security plugin with an administration account made by ``mosquitto_ctrl dynsec init``.
The shared test stack is not touched.

A device issued through the plugin connects over TLS with its own id as client id and publishes
under its own topics (delivered to ingest's account), is refused another device's topics and
another client id; rotating refuses the old password and accepts the new; revoking refuses it;
an account issued again gets a new password; a wrong administration password is reported as
the broker being unavailable. The accounts are built from the API's settings, as bootstrap
does."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from services.api.adapters.dynsec import DynsecBrokerAccounts, from_settings
from services.api.service_layer.enrolment import BrokerUnavailable
from services.api.settings import ApiSettings
from tests.api.conftest import free_port
from tests.polling import eventually_sync
from vigil_tools.stack.mosquitto import run_as_user
from vigil_tools.stack.process import chown_tree, port_accepts
from vigil_tools.stack.settings import StackSettings
from vigil_tools.stack.tls import ensure_certificates

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "vigil-dynsec-admin"  # the compose deployment's (docker-compose.yml)
INGEST = "vigil-ingest"
TIMEOUT_S = 10.0


@dataclass
class Broker:
    port: int
    ca_file: Path
    admin_secret: Path
    ingest_password: str
    log_file: Path


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture
def broker() -> Iterator[Broker]:
    stack = StackSettings()
    for needed in (stack.mosquitto_bin, stack.mosquitto_dynsec_plugin):
        assert needed.exists(), f"{needed} is missing: make setup installs Debian's mosquitto"
    base = Path(tempfile.mkdtemp(prefix="vigil-dynsec-"))
    os.chmod(base, 0o755)  # as root the broker drops to its own user
    port = free_port()
    tls = ensure_certificates(StackSettings(data_dir=base), datetime.now(UTC))
    admin_secret = base / "dynsec-admin.secret"
    admin_password = uuid.uuid4().hex
    admin_secret.write_text(admin_password + "\n")
    admin_secret.chmod(0o600)
    dynsec_file = base / "dynamic-security.json"
    _run("mosquitto_ctrl", "dynsec", "init", str(dynsec_file), ADMIN, admin_password)
    ingest_password = uuid.uuid4().hex
    passwd = base / "passwd"
    passwd.touch()
    _run(str(stack.mosquitto_passwd_bin), "-b", str(passwd), INGEST, ingest_password)
    shutil.copy(ROOT / "deploy" / "compose" / "acl", base / "acl")
    log_file = base / "mosquitto.log"
    log_file.touch()
    conf = base / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        f"certfile {tls.server_cert}\nkeyfile {tls.server_key}\ntls_version tlsv1.2\n"
        f"user {run_as_user()}\n"
        "allow_anonymous false\n"
        f"password_file {passwd}\nacl_file {base / 'acl'}\n"
        f"plugin {stack.mosquitto_dynsec_plugin}\nplugin_opt_config_file {dynsec_file}\n"
        "persistence false\n"
        f"log_dest file {log_file}\nlog_type all\nconnection_messages true\n"
    )
    chown_tree(base, run_as_user())
    process = subprocess.Popen(
        [str(stack.mosquitto_bin), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:

        def listening() -> bool:
            if process.poll() is not None:
                pytest.fail(f"mosquitto exited with {process.returncode}: {log_file.read_text()}")
            return port_accepts(port)

        eventually_sync(listening, timeout_s=TIMEOUT_S, what=f"Mosquitto on 127.0.0.1:{port}")
        yield Broker(port, tls.ca_cert, admin_secret, ingest_password, log_file)
    finally:
        process.terminate()
        try:
            process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(base, ignore_errors=True)


def accounts_for(broker: Broker, password_file: Path | None = None) -> DynsecBrokerAccounts:
    settings = ApiSettings(
        environment="development",
        broker_admin_username=ADMIN,
        broker_admin_password_file=password_file or broker.admin_secret,
        broker_host="127.0.0.1",
        broker_port=broker.port,
        broker_tls_ca_file=broker.ca_file,
        device_broker_host="mqtt.hospital.example",
    )
    wired = from_settings(settings)
    assert wired is not None
    accounts, endpoint = wired
    assert (endpoint.host, endpoint.port, endpoint.tls) == (
        "mqtt.hospital.example",
        broker.port,
        True,
    )
    return accounts


class Session:
    """One MQTT 5 connection over TLS: the CONNACK's reason, then PUBACKs and messages."""

    def __init__(self, broker: Broker, username: str, password: str, client_id: str) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(username, password)
        self.client.tls_set(ca_certs=str(broker.ca_file))
        self.connack: str | None = None
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.pubacks: dict[int, str] = {}
        self.acked = threading.Condition()
        self.received: list[tuple[str, bytes]] = []
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.received.append((m.topic, bytes(m.payload)))
        self.client.connect("127.0.0.1", broker.port, keepalive=30, clean_start=True)
        self.client.loop_start()
        assert self.connected.wait(TIMEOUT_S), f"no CONNACK for {username}"

    def _on_connect(self, _c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        self.connack = str(reason)
        self.connected.set()

    def _on_publish(self, _c: object, _u: object, mid: int, reason: object, _p: object) -> None:
        with self.acked:
            self.pubacks[mid] = str(reason)
            self.acked.notify_all()

    def publish(self, topic: str, payload: bytes) -> str:
        """The PUBACK's reason for a QoS 1 publish."""
        mid = self.client.publish(topic, payload, qos=1).mid
        with self.acked:
            assert self.acked.wait_for(lambda: mid in self.pubacks, TIMEOUT_S), f"no PUBACK {topic}"
            return self.pubacks[mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def session(
    broker: Broker, username: str, password: str, client_id: str | None = None
) -> Iterator[Session]:
    opened = Session(broker, username, password, client_id or username)
    try:
        yield opened
    finally:
        opened.close()


def connack(broker: Broker, username: str, password: str, client_id: str | None = None) -> str:
    with session(broker, username, password, client_id) as opened:
        return str(opened.connack)


@contextmanager
def ingest(broker: Broker) -> Iterator[Session]:
    with session(broker, INGEST, broker.ingest_password, f"{INGEST}-{uuid.uuid4().hex[:6]}") as s:
        assert s.connack == "Success", s.connack
        s.client.subscribe("vigil/v1/dev/#", qos=1)
        assert s.subscribed.wait(TIMEOUT_S)
        yield s


ALLOWED = {"Success", "No matching subscribers"}


def test_issue_rotate_revoke_on_a_compose_broker(broker: Broker) -> None:
    accounts = accounts_for(broker)
    run = uuid.uuid4().hex[:8]
    device, other = f"thermo-{run}", f"pump-{run}"
    password = accounts.issue(device)
    other_password = accounts.issue(other)

    with ingest(broker) as reader:
        with session(broker, device, password) as dev:
            assert dev.connack == "Success"
            own = f"vigil/v1/dev/{device}/temperature"
            assert dev.publish(own, b"mine") in ALLOWED
            eventually_sync(
                lambda: (own, b"mine") in reader.received,
                timeout_s=TIMEOUT_S,
                what="the device's own message delivered to ingest",
            )
        with session(broker, device, password) as dev:
            foreign = f"vigil/v1/dev/{other}/pump-status"
            assert dev.publish(foreign, b"not mine") == "Not authorized"
        assert all(topic != foreign for topic, _ in reader.received)
    # Bound to its own client id: another device's id (or ingest's) is refused at CONNECT.
    assert connack(broker, device, password, client_id=other) == "Not authorized"
    assert connack(broker, device, password, client_id=INGEST) == "Not authorized"

    rotated = accounts.rotate(device)
    assert rotated != password
    assert connack(broker, device, password) == "Not authorized"
    with session(broker, device, rotated) as dev:
        assert dev.connack == "Success"
        assert dev.publish(f"vigil/v1/dev/{device}/temperature", b"after rotation") in ALLOWED

    accounts.revoke(device)
    assert connack(broker, device, rotated) == "Not authorized"
    accounts.revoke(device)  # already gone: nothing to do, no error
    assert connack(broker, other, other_password) == "Success"

    # Issued again (an account left from an earlier attempt): a new password, the same limits.
    again = accounts.issue(other)
    assert connack(broker, other, other_password) == "Not authorized"
    with session(broker, other, again) as dev:
        assert dev.connack == "Success"
        assert dev.publish(f"vigil/v1/dev/{other}/pump-status", b"ok") in ALLOWED
    with session(broker, other, again) as dev:
        assert dev.publish(f"vigil/v1/dev/{device}/temperature", b"no") == "Not authorized"

    with pytest.raises(BrokerUnavailable, match="not found"):
        accounts.rotate(device)  # revoked: no account to rotate


def test_a_wrong_administration_password_is_the_broker_unavailable(
    broker: Broker, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not-the-password\n")
    with pytest.raises(BrokerUnavailable, match="refused the login"):
        accounts_for(broker, wrong).issue(f"thermo-{uuid.uuid4().hex[:8]}")
    with pytest.raises(BrokerUnavailable, match="cannot be read"):
        accounts_for(broker, tmp_path / "missing.secret").issue("thermo-x")
