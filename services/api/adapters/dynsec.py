"""Device accounts on a deployment's Mosquitto, through its dynamic security plugin: the API's
``BrokerAccounts`` where the broker is not on this machine (docker-compose.yml, the Helm chart).

The plugin is driven over MQTT: JSON commands published to ``$CONTROL/dynamic-security/v1`` as
an administration account whose role may use that topic (compose creates one with
``mosquitto_ctrl dynsec init``), answers read from ``…/v1/response``. Each device gets

- a client named by its device id, with a password (the plugin's own, PBKDF2 hashed by the
  broker) and its device id as its only client id (docs/mqtt.md 1.1);
- a role of its own, ``vigil-device-<id>``, that lets it publish under
  ``vigil/v1/dev/<id>/#`` and subscribe to and receive ``vigil/v1/ack/<id>``, the same topics
  the ACL file of the compose broker grants every device by pattern (deploy/compose/acl), so a
  broker that relies on the plugin alone grants exactly those too.

Issuing creates both (an account left over from an earlier attempt gets a new password, its
client id and its role back); rotating sets a new password; revoking deletes the client and its
role. The broker disconnects a connected client whose account is deleted. Every call opens its
own connection, sends its commands in one message and waits for their answers (matched by
correlation data, since every administrator receives every answer); calls block, as the port
says. A broker that cannot be reached or refuses a command raises ``BrokerUnavailable``.
"""

from __future__ import annotations

import json
import secrets
import ssl
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as paho_mqtt
from paho.mqtt.enums import CallbackAPIVersion

from services.api.service_layer.enrolment import (
    DEVICE_ID,
    RESERVED_PREFIX,
    TOPIC_ROOT,
    BrokerEndpoint,
    BrokerUnavailable,
)
from services.api.settings import ApiSettings

CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC: Final = f"{CONTROL_TOPIC}/response"
ROLE_PREFIX: Final = "vigil-device-"
ACK_ROOT: Final = "vigil/v1/ack"
# The plugin's answers to what is already as wanted.
_CLIENT_EXISTS: Final = "Client already exists"
_CLIENT_MISSING: Final = "Client not found"
_ROLE_EXISTS: Final = "Role already exists"
_ROLE_MISSING: Final = "Role not found"


@dataclass(frozen=True, slots=True)
class DynsecConnection:
    """How the API reaches the plugin: the broker (over TLS when ``tls_ca_file`` names the CA
    that signed its certificate) and the administration account, whose password is read from
    ``admin_password_file`` at every call (so a new one takes effect without a restart)."""

    host: str
    port: int
    admin_username: str
    admin_password_file: Path
    tls_ca_file: Path | None = None
    timeout_s: float = 10.0


def device_role(device_id: str) -> str:
    return f"{ROLE_PREFIX}{device_id}"


def device_acls(device_id: str) -> list[dict[str, Any]]:
    """What a device may do: publish under its own topics, read its own acknowledgements."""
    ack = f"{ACK_ROOT}/{device_id}"
    return [
        {"acltype": "publishClientSend", "topic": f"{TOPIC_ROOT}/{device_id}/#", "allow": True},
        {"acltype": "subscribeLiteral", "topic": ack, "allow": True},
        {"acltype": "unsubscribeLiteral", "topic": ack, "allow": True},
        {"acltype": "publishClientReceive", "topic": ack, "allow": True},
    ]


def new_password() -> str:
    return secrets.token_urlsafe(24)


class DynsecBrokerAccounts:
    """``BrokerAccounts`` over the dynamic security plugin of a running Mosquitto."""

    def __init__(self, connection: DynsecConnection) -> None:
        self._connection = connection

    def issue(self, device_id: str) -> str:
        _check_device_id(device_id)
        password = new_password()
        role = device_role(device_id)
        answers = self._run(
            [
                {"command": "createRole", "rolename": role, "acls": device_acls(device_id)},
                {
                    "command": "createClient",
                    "username": device_id,
                    "password": password,
                    "clientid": device_id,
                    "roles": [{"rolename": role}],
                },
            ],
            tolerate={_ROLE_EXISTS, _CLIENT_EXISTS},
        )
        if answers[1] == _CLIENT_EXISTS:
            # An account left from an earlier attempt: replaced as a new one would be.
            self._run(
                [
                    {
                        "command": "modifyClient",
                        "username": device_id,
                        "password": password,
                        "clientid": device_id,
                        "roles": [{"rolename": role}],
                    },
                    {"command": "enableClient", "username": device_id},
                ]
            )
        return password

    def rotate(self, device_id: str) -> str:
        _check_device_id(device_id)
        password = new_password()
        self._run([{"command": "setClientPassword", "username": device_id, "password": password}])
        return password

    def revoke(self, device_id: str) -> None:
        _check_device_id(device_id)
        self._run(
            [
                {"command": "deleteClient", "username": device_id},
                {"command": "deleteRole", "rolename": device_role(device_id)},
            ],
            tolerate={_CLIENT_MISSING, _ROLE_MISSING},
        )

    # -- the control topic ------------------------------------------------------------------

    def _run(
        self, commands: list[dict[str, Any]], tolerate: set[str] | frozenset[str] = frozenset()
    ) -> list[str | None]:
        """Send ``commands`` in one message; the error of each (None: done). An error outside
        ``tolerate`` raises ``BrokerUnavailable`` naming the command, never its password."""
        call = uuid.uuid4().hex
        tagged = [{**c, "correlationData": f"{call}-{i}"} for i, c in enumerate(commands)]
        answers = self._exchange(call, tagged)
        errors: list[str | None] = []
        for i, command in enumerate(commands):
            error = answers.get(f"{call}-{i}")
            if error is not None and error not in tolerate:
                raise BrokerUnavailable(
                    f"the broker refused {command['command']} for "
                    f"{command.get('username') or command.get('rolename')}: {error}"
                )
            errors.append(error)
        return errors

    def _exchange(self, call: str, commands: list[dict[str, Any]]) -> dict[str, str | None]:
        conn = self._connection
        try:
            password = conn.admin_password_file.read_text().strip()
        except OSError as error:
            raise BrokerUnavailable(
                f"the broker's administration password cannot be read: {error.strerror}"
            ) from error
        answers: dict[str, str | None] = {}
        lock = threading.Lock()
        connected, subscribed, answered = threading.Event(), threading.Event(), threading.Event()
        refused: list[str] = []
        client = paho_mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"vigil-api-dynsec-{call[:12]}",
            protocol=paho_mqtt.MQTTv5,
        )
        client.username_pw_set(conn.admin_username, password)
        if conn.tls_ca_file is not None:
            client.tls_set(ca_certs=str(conn.tls_ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)

        def on_connect(_c: object, _u: object, _f: object, reason: Any, _p: object) -> None:
            if reason.is_failure:
                refused.append(str(reason))
            connected.set()

        def on_subscribe(_c: object, _u: object, _m: object, reasons: Any, _p: object) -> None:
            if any(r.is_failure for r in reasons):
                refused.append(f"subscription to {RESPONSE_TOPIC}: {reasons[0]}")
            subscribed.set()

        def on_message(_c: object, _u: object, message: paho_mqtt.MQTTMessage) -> None:
            try:
                responses = json.loads(message.payload).get("responses", [])
            except (ValueError, AttributeError):
                return
            with lock:
                for response in responses:
                    tag = response.get("correlationData")
                    if isinstance(tag, str) and tag.startswith(call):
                        answers[tag] = response.get("error")
                if len(answers) == len(commands):
                    answered.set()

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        where = f"{conn.host}:{conn.port}"
        try:
            client.connect(conn.host, conn.port, keepalive=30, clean_start=True)
            client.loop_start()
            if not connected.wait(conn.timeout_s):
                raise BrokerUnavailable(f"the broker at {where} did not answer the connection")
            if refused:
                raise BrokerUnavailable(f"the broker at {where} refused the login: {refused[0]}")
            client.subscribe(RESPONSE_TOPIC, qos=1)
            if not subscribed.wait(conn.timeout_s) or refused:
                raise BrokerUnavailable(
                    f"the broker at {where} did not let the administration account read "
                    f"{RESPONSE_TOPIC}"
                )
            client.publish(CONTROL_TOPIC, json.dumps({"commands": commands}), qos=1)
            if not answered.wait(conn.timeout_s):
                raise BrokerUnavailable(
                    f"the broker at {where} did not answer on {RESPONSE_TOPIC} (is the dynamic "
                    "security plugin loaded?)"
                )
        except (OSError, ssl.SSLError) as error:
            raise BrokerUnavailable(f"cannot reach the broker at {where}: {error}") from error
        finally:
            client.disconnect()
            client.loop_stop()
        with lock:
            return dict(answers)


def from_settings(settings: ApiSettings) -> tuple[DynsecBrokerAccounts, BrokerEndpoint] | None:
    """The accounts and the endpoint devices are told, when the settings name an
    administration account (``VIGIL_API_BROKER_*``); None otherwise."""
    if not settings.broker_admin_username or settings.broker_admin_password_file is None:
        return None
    accounts = DynsecBrokerAccounts(
        DynsecConnection(
            host=settings.broker_host,
            port=settings.broker_port,
            admin_username=settings.broker_admin_username,
            admin_password_file=settings.broker_admin_password_file,
            tls_ca_file=settings.broker_tls_ca_file,
        )
    )
    endpoint = BrokerEndpoint(
        host=settings.device_broker_host or settings.broker_host,
        port=settings.device_broker_port or settings.broker_port,
        tls=settings.broker_tls_ca_file is not None,
    )
    return accounts, endpoint


def _check_device_id(device_id: str) -> None:
    # Checked by the use cases already; a topic level with a wildcard would widen the role.
    if not DEVICE_ID.fullmatch(device_id) or device_id.startswith(RESERVED_PREFIX):
        raise ValueError(f"invalid device id {device_id!r}")
