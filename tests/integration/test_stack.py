"""The local stack for real: a throw-away stack on free ports, checked component by component,
then purged. Needs Mosquitto, PostgreSQL 15, Java 17 and the Kafka jars (fetched once by Maven)."""

from __future__ import annotations

import importlib.util
import queue
import shutil
import smtplib
import socket
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import asyncpg
import paho.mqtt.client as mqtt
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.polling import eventually_sync
from vigil_tools.stack import (
    StackSettings,
    add_device_credential,
    down,
    revoke_device_credential,
    stack_env,
    status,
    up,
)
from vigil_tools.stack.process import port_accepts
from vigil_tools.stack.topics import topic_specs

pytestmark = pytest.mark.stack

WAIT_S = 10.0


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on right now, chosen by the kernel; other stacks on this machine
    (a developer's, the shared test stack, another engineer's) keep theirs."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def stack_ports(settings: StackSettings) -> list[int]:
    return [
        settings.mqtt_port,
        settings.mqtt_tls_port,
        settings.kafka_port,
        settings.kafka_controller_port,
        settings.pg_port,
        settings.smtp_port,
    ]


@pytest.fixture(scope="module")
def stack() -> Iterator[StackSettings]:
    """A stack of its own in a fresh directory; always stopped and deleted afterwards."""
    # Short and under /tmp: the PostgreSQL socket path inside it must stay below 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="vigil-stack-it-"))
    mqtt, mqtt_tls, kafka, controller, pg, smtp = free_ports(6)
    settings = StackSettings(
        data_dir=root / "stack",
        mqtt_port=mqtt,
        mqtt_tls_port=mqtt_tls,
        kafka_port=kafka,
        kafka_controller_port=controller,
        pg_port=pg,
        smtp_port=smtp,
        kafka_partitions=4,
    )
    try:
        up(settings)
        yield settings
    finally:
        down(settings, purge=True)
        shutil.rmtree(root, ignore_errors=True)


class Mqtt:
    """A paho client driven from a test thread: connect, subscribe, publish, collect messages."""

    def __init__(self, port: int, client_id: str, username: str | None, password: str | None):
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.port = port
        self.connack: ReasonCode | None = None
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if self.connack is None:
            self.connack = reason_code
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        self.subscribed.set()

    def _on_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        self.messages.put((message.topic, message.payload))

    def connect(self) -> ReasonCode:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self.connected.wait(WAIT_S), "no CONNACK"
        assert self.connack is not None
        return self.connack

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(WAIT_S), "no SUBACK"

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mqtt_clients() -> Iterator[list[Mqtt]]:
    clients: list[Mqtt] = []
    yield clients
    for client in clients:
        client.close()


def connect(
    clients: list[Mqtt], settings: StackSettings, username: str | None, password: str | None
) -> tuple[Mqtt, ReasonCode]:
    # A device account may connect only with its own id as client id (the broker refuses any
    # other); service accounts and anonymous attempts take a random one.
    device = username is not None and not username.startswith("vigil-")
    client_id = username if username is not None and device else f"it-{uuid.uuid4().hex[:8]}"
    client = Mqtt(settings.mqtt_port, client_id, username, password)
    clients.append(client)
    return client, client.connect()


def listening_addresses(port: int) -> set[str]:
    """Local addresses of listening TCP sockets on ``port`` (from /proc, IPv4 and IPv6)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A = LISTEN
                found.add(address)
    return found


LOOPBACK = {
    "0100007F",  # 127.0.0.1
    "0000000000000000FFFF00000100007F",  # ::ffff:127.0.0.1, as Java binds it
}


def test_up_starts_every_component_on_loopback_only(stack: StackSettings) -> None:
    """After `up` every component runs, its ports accept, no socket listens beyond 127.0.0.1,
    and the secrets and env file are private to the owner."""
    report = status(stack)
    assert {name: info["running"] for name, info in report.items()} == {
        "mosquitto": True,
        "kafka": True,
        "postgres": True,
        "mailsink": True,
    }
    for port in stack_ports(stack):
        assert port_accepts(port)
        addresses = listening_addresses(port)
        assert addresses and addresses <= LOOPBACK, (port, addresses)
    for private in (stack.secrets_file, stack.env_file):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    lines = dict(line.split("=", 1) for line in stack.env_file.read_text().splitlines())
    assert lines == stack_env(stack)


def test_ingest_receives_what_the_simulator_publishes(
    stack: StackSettings, mqtt_clients: list[Mqtt]
) -> None:
    """vigil-sim may publish device telemetry and vigil-ingest may read it through a shared
    subscription, with the generated passwords."""
    env = stack_env(stack)
    ingest, code = connect(
        mqtt_clients, stack, env["VIGIL_INGEST_MQTT_USERNAME"], env["VIGIL_INGEST_MQTT_PASSWORD"]
    )
    assert not code.is_failure
    ingest.subscribe("$share/ingest/vigil/v1/dev/#")
    sim, code = connect(
        mqtt_clients, stack, env["VIGIL_SIM_MQTT_USERNAME"], env["VIGIL_SIM_MQTT_PASSWORD"]
    )
    assert not code.is_failure
    sim.publish("vigil/v1/dev/dev-0001/temperature", b'{"celsius": 38.6}')
    assert ingest.messages.get(timeout=WAIT_S) == (
        "vigil/v1/dev/dev-0001/temperature",
        b'{"celsius": 38.6}',
    )


def test_anonymous_and_wrong_password_clients_are_refused(
    stack: StackSettings, mqtt_clients: list[Mqtt]
) -> None:
    """Without credentials, or with a wrong password, the broker refuses the connection."""
    _, anonymous = connect(mqtt_clients, stack, None, None)
    assert anonymous.is_failure and anonymous.getName() == "Not authorized"
    _, wrong = connect(mqtt_clients, stack, "vigil-sim", "not-the-password")
    assert wrong.is_failure


def test_a_device_credential_publishes_only_under_its_own_id(
    stack: StackSettings, mqtt_clients: list[Mqtt]
) -> None:
    """A device account from add_device_credential works at once; what it publishes on another
    device's topic never reaches a subscriber (Mosquitto 2.0 also drops its connection), what it
    publishes on its own topic does; once revoked it can no longer connect."""
    env = stack_env(stack)
    ingest, _ = connect(
        mqtt_clients, stack, env["VIGIL_INGEST_MQTT_USERNAME"], env["VIGIL_INGEST_MQTT_PASSWORD"]
    )
    ingest.subscribe("vigil/v1/dev/#")
    password = add_device_credential(stack, "dev-a")

    device, code = connect(mqtt_clients, stack, "dev-a", password)
    assert not code.is_failure
    device.publish("vigil/v1/dev/dev-b/temperature", b"spoofed")
    # The broker handles one client's packets in order and delivers to one subscriber in order,
    # so if the spoofed message had been routed it would arrive before this one.
    device, code = connect(mqtt_clients, stack, "dev-a", password)
    assert not code.is_failure
    device.publish("vigil/v1/dev/dev-a/temperature", b"genuine")
    assert ingest.messages.get(timeout=WAIT_S) == ("vigil/v1/dev/dev-a/temperature", b"genuine")
    assert ingest.messages.empty()

    revoke_device_credential(stack, "dev-a")
    _, code = connect(mqtt_clients, stack, "dev-a", password)
    assert code.is_failure


async def test_kafka_topics_exist_with_their_partitions_and_retention(
    stack: StackSettings,
) -> None:
    """Every topic exists with its configured partition count and retention, and asking for an
    unknown topic does not create it (auto-creation is off)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{stack.kafka_port}")
    await admin.start()
    try:
        specs = topic_specs(stack.kafka_partitions)
        described = {t["topic"]: t for t in await admin.describe_topics([s.name for s in specs])}
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, spec.name) for spec in specs]
        )
        retention = {
            resource["resource_name"]: {
                (entry.get("config_name") or entry.get("config_names")): entry["config_value"]
                for entry in resource["config_entries"]
            }["retention.ms"]
            for response in responses
            for resource in response.to_object()["resources"]
        }
        for spec in specs:
            assert described[spec.name]["error_code"] == 0
            assert len(described[spec.name]["partitions"]) == spec.partitions, spec.name
            assert retention[spec.name] == str(spec.retention_ms), spec.name
        assert len(described["vigil.telemetry.v1"]["partitions"]) == 4  # kafka_partitions

        stray = f"vigil.typo.{uuid.uuid4().hex[:6]}"
        await admin.describe_topics([stray])
        assert stray not in await admin.list_topics()
    finally:
        await admin.close()


async def test_postgres_accepts_only_the_vigil_role_with_its_password(
    stack: StackSettings,
) -> None:
    """The DSN from stack_env logs in as the unprivileged owner of database vigil, migrations
    are applied when vigil.db.migrate exists, and neither a wrong password nor the superuser over
    TCP gets in."""
    dsn = stack_env(stack)["VIGIL_PG_DSN"]
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT current_user") == "vigil"
        assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = 'vigil'") is False
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        owner = await conn.fetchval(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'vigil'"
        )
        assert owner == "vigil"
        if importlib.util.find_spec("vigil.db.migrate") is not None:
            assert await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(dsn.replace("vigil:", "vigil:wrong", 1))
    superuser = dsn.replace("postgresql://vigil:", "postgresql://postgres:", 1)
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(superuser.replace("/vigil", "/postgres"))


def test_mail_sink_stores_each_message_as_an_eml_file(stack: StackSettings) -> None:
    """A message sent to the SMTP port lands in data_dir/mail as one .eml with its envelope."""
    message = EmailMessage()
    message["From"] = "notify@vigil.local"
    message["To"] = "oncall@example.org"
    message["Subject"] = "PAGE fever dev-0001"
    message.set_content("Temperature 38.6 C")
    with smtplib.SMTP("127.0.0.1", stack.smtp_port, timeout=WAIT_S) as smtp:
        smtp.send_message(message)
    stored = eventually_sync(
        lambda: list(stack.mail_dir.glob("*.eml")), timeout_s=WAIT_S, what="the stored e-mail"
    )
    assert len(stored) == 1
    content = stored[0].read_text()
    assert "Subject: PAGE fever dev-0001" in content
    assert "X-Vigil-Envelope-To: oncall@example.org" in content


def test_up_on_a_running_stack_starts_nothing_and_is_quick(stack: StackSettings) -> None:
    """A second `up` keeps every pid and returns within 2 s (it only re-checks topics and
    migrations)."""
    before = {name: info["pid"] for name, info in status(stack).items()}
    started = time.monotonic()
    up(stack)
    elapsed = time.monotonic() - started
    assert {name: info["pid"] for name, info in status(stack).items()} == before
    assert elapsed < 2.0, f"idempotent up took {elapsed:.2f} s"


def test_down_purge_stops_everything_and_removes_the_data_dir(stack: StackSettings) -> None:
    """`down(purge=True)` stops every process, frees every port and deletes data_dir; a
    second `down` is a no-op."""
    pids = [info["pid"] for info in status(stack).values()]
    down(stack, purge=True)
    assert not stack.data_dir.exists()
    assert not any(info["running"] for info in status(stack).values())
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    for port in stack_ports(stack):
        assert not port_accepts(port)
    down(stack, purge=True)
