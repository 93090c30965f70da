"""The broker's TLS listener on the real stack: a device with its own credentials gets a reading
through TLS into ingest (itself connected over TLS) and Kafka; a client that does not trust the
stack's CA, a plaintext client, a client below TLS 1.2 and a wrong password are all refused; and
the ACL holds on the TLS listener exactly as on the plain one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import aiomqtt
import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.kafka_topics import TELEMETRY_TOPIC
from services.ingest.adapters.credentials import issue_credential, revoke_credential
from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)
from tests.factories import temperature_message
from tests.kafka_helpers import end_offsets
from tests.polling import eventually, until_ready
from vigil_tools.stack.accounts import LocalStackBroker

pytestmark = pytest.mark.stack

# MQTT 3.1.1 CONNECT without credentials, client id "tls-probe", keep-alive 30 s: enough to make
# a broker answer with a CONNACK (0x20) when it speaks MQTT on the socket.
_CONNECT_PACKET = (
    b"\x10\x15"  # CONNECT, remaining length 21
    b"\x00\x04MQTT\x04\x02\x00\x1e"  # protocol name, level 4, clean session, keep-alive 30
    b"\x00\x09tls-probe"  # client id
)


@pytest.fixture(scope="module")
def tls(stack_env: dict[str, str]) -> tuple[int, str]:
    """The TLS port and CA file the stack exports, after checking the listener is up."""
    port, ca_file = int(stack_env["VIGIL_MQTT_TLS_PORT"]), stack_env["VIGIL_MQTT_TLS_CA_FILE"]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError as exc:
        pytest.fail(
            f"no TLS listener on 127.0.0.1:{port} ({exc}); a broker started before the TLS "
            "listener existed keeps its old listeners: stop the stack and start it again"
        )
    return port, ca_file


def tls_client(
    port: int, ca_file: str | None, username: str, password: str, client_id: str
) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        username=username,
        password=password,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_params=aiomqtt.TLSParameters(ca_certs=ca_file),
    )


@contextlib.asynccontextmanager
async def device_account(stack_env: dict[str, str], device_id: str) -> AsyncIterator[str]:
    """A device's MQTT account, issued as the project issues it, revoked afterwards."""
    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    broker = LocalStackBroker()
    try:
        yield await issue_credential(conn, broker, device_id)
    finally:
        await revoke_credential(conn, broker, device_id)
        await conn.close()


def first_reply(port: int, data: bytes, use_tls: ssl.SSLContext | None = None) -> bytes:
    """The first bytes the broker sends back after ``data`` (b"" when it just hangs up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if use_tls is None:
            raw.sendall(data)
            with contextlib.suppress(ConnectionResetError):
                return raw.recv(16)
            return b""
        with use_tls.wrap_socket(raw, server_hostname="127.0.0.1") as wrapped:
            wrapped.sendall(data)
            return wrapped.recv(16)


def test_the_listener_presents_a_certificate_for_loopback_signed_by_the_stack_ca(
    tls: tuple[int, str],
) -> None:
    """A client trusting only the exported CA verifies the broker under both loopback names and
    negotiates TLS 1.2 or newer; the MQTT session on top works (CONNACK)."""
    port, ca_file = tls
    context = ssl.create_default_context(cafile=ca_file)
    for name in ("127.0.0.1", "localhost"):
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=name) as wrapped,
        ):
            assert wrapped.version() in {"TLSv1.2", "TLSv1.3"}, name
    # A CONNACK (0x20) with a non-zero return code: MQTT runs over TLS and still wants a password.
    reply = first_reply(port, _CONNECT_PACKET, use_tls=context)
    assert reply[:1] == b"\x20" and reply[3:4] != b"\x00"


def test_a_client_that_does_not_trust_the_stack_ca_fails_the_handshake(
    tls: tuple[int, str],
) -> None:
    """With only the system's CAs, certificate verification fails: the listener's certificate
    comes from the stack's own CA, and a client must be given that CA to connect."""
    port, _ = tls
    context = ssl.create_default_context()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(raw, server_hostname="127.0.0.1")


async def test_a_device_that_does_not_trust_the_ca_cannot_connect_even_with_its_password(
    stack_env: dict[str, str], tls: tuple[int, str]
) -> None:
    """An MQTT client with valid credentials but the system's CAs only is refused at TLS, before
    its password is ever sent; the same client given the CA connects."""
    port, ca_file = tls
    device = f"tls-untrusting-{uuid.uuid4().hex[:8]}"
    async with device_account(stack_env, device) as password:
        with pytest.raises(aiomqtt.MqttError):
            async with tls_client(port, None, device, password, device):
                pass
        async with tls_client(port, ca_file, device, password, device):
            pass


def test_a_plaintext_client_on_the_tls_port_gets_no_mqtt_session(
    stack_env: dict[str, str], tls: tuple[int, str]
) -> None:
    """The CONNECT that the plain listener answers with a CONNACK gets no CONNACK on the TLS
    port: nothing unencrypted is spoken there."""
    port, _ = tls
    plain = first_reply(int(stack_env["VIGIL_MQTT_PORT"]), _CONNECT_PACKET)
    assert plain[:1] == b"\x20", "control: the plain listener must answer this CONNECT"
    assert first_reply(port, _CONNECT_PACKET)[:1] != b"\x20"


def test_a_client_below_tls_1_2_is_refused_by_the_broker(tls: tuple[int, str]) -> None:
    """A client offering only TLS 1.1 gets the broker's "protocol version" alert: the listener
    accepts TLS 1.2 or newer only (the refusal comes from the server, not the client's library)."""
    port, ca_file = tls
    with warnings.catch_warnings():
        # Python warns when a context enables TLS 1.1, which is exactly what this test needs.
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(ca_file)
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        pytest.raises(ssl.SSLError) as refused,
    ):
        context.wrap_socket(raw, server_hostname="127.0.0.1")
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value


async def test_wrong_credentials_over_tls_are_refused(
    stack_env: dict[str, str], tls: tuple[int, str]
) -> None:
    """Over TLS the broker still checks the password file: the device's own password connects,
    a wrong one and an unknown user are refused at CONNECT."""
    port, ca_file = tls
    device = f"tls-creds-{uuid.uuid4().hex[:8]}"
    async with device_account(stack_env, device) as password:
        async with tls_client(port, ca_file, device, password, device):
            pass
        for username, wrong in ((device, password + "x"), (f"nobody-{device}", password)):
            with pytest.raises(aiomqtt.MqttCodeError) as refused:
                async with tls_client(port, ca_file, username, wrong, device):
                    pass
            # Mosquitto 2.0 answers a failed password check with MQTT 5 reason code 0x87, "Not
            # authorized" (not 0x86), as on the plain listener.
            assert refused.value.rc == 0x87, refused.value


async def test_a_device_over_tls_cannot_publish_on_another_devices_topic(
    stack_env: dict[str, str], tls: tuple[int, str]
) -> None:
    """The ACL applies to the TLS listener: A's publish under B's topic is dropped, and a watcher
    sees A's later marker on A's own topic first."""
    port, ca_file = tls
    run = uuid.uuid4().hex[:8]
    a, b = f"tls-acl-a-{run}", f"tls-acl-b-{run}"
    async with (
        device_account(stack_env, a) as password_a,
        device_account(stack_env, b),
        aiomqtt.Client(
            "127.0.0.1",
            int(stack_env["VIGIL_MQTT_PORT"]),
            username=stack_env["VIGIL_INGEST_MQTT_USERNAME"],
            password=stack_env["VIGIL_INGEST_MQTT_PASSWORD"],
            identifier=f"tls-acl-watch-{run}",
        ) as watcher,
    ):
        await watcher.subscribe(f"vigil/v1/dev/{a}/#", qos=1)
        await watcher.subscribe(f"vigil/v1/dev/{b}/#", qos=1)
        async with tls_client(port, ca_file, a, password_a, a) as device:
            await device.publish(f"vigil/v1/dev/{b}/temperature", b"{}", qos=1)
        # Mosquitto closes the offending connection; reconnect to send the marker.
        async with tls_client(port, ca_file, a, password_a, a) as device:
            await device.publish(f"vigil/v1/dev/{a}/temperature", b"marker", qos=1)
        message = await asyncio.wait_for(anext(watcher.messages), 10)
        assert message.topic.value == f"vigil/v1/dev/{a}/temperature"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def http_status(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


async def read_telemetry(
    bootstrap: str, start: dict[TopicPartition, int], match: Callable[[dict[str, object]], bool]
) -> list[dict[str, object]]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    found: list[dict[str, object]] = []
    try:
        consumer.assign(list(start))
        for tp, offset in start.items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + 60
        while not found and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                found += [doc for r in records if match(doc := json.loads(r.value))]
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()
    return found


async def test_a_reading_over_tls_reaches_kafka_through_ingest_over_tls(
    stack_env: dict[str, str], tls: tuple[int, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registered device publishes with its own credentials over TLS; ingest, connected to the
    TLS listener with VIGIL_INGEST_MQTT_TLS_CA_FILE, binds it to its patient and writes it to
    Kafka keyed by that patient, and stores the row."""
    from services.ingest.app import run
    from services.ingest.settings import IngestSettings

    port, ca_file = tls
    run_id = uuid.uuid4().hex[:8]
    device, patient = f"tls-thermo-{run_id}", f"P-tls-{run_id}"
    dsn, bootstrap = stack_env["VIGIL_PG_DSN"], stack_env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    conn = await asyncpg.connect(dsn)
    try:
        await upsert_care_team(conn, f"team-{run_id}", "TLS", f"tls-{run_id}@hospital.test")
        await upsert_patient(conn, patient, f"team-{run_id}")
        await upsert_device(conn, device, "thermometer", "test")
        await bind_device(conn, device, patient, datetime.now(UTC) - timedelta(days=1))
    finally:
        await conn.close()

    start = await end_offsets(bootstrap, TELEMETRY_TOPIC)
    metrics_port = free_port()
    client_id = f"ingest-tls-{run_id}"
    monkeypatch.setenv("VIGIL_MQTT_PORT", str(port))
    monkeypatch.setenv("VIGIL_INGEST_MQTT_TLS_CA_FILE", ca_file)
    monkeypatch.setenv("VIGIL_INGEST_MQTT_CLIENT_ID", client_id)
    monkeypatch.setenv("VIGIL_INGEST_MQTT_SHARE_GROUP", client_id)
    monkeypatch.setenv("VIGIL_INGEST_METRICS_PORT", str(metrics_port))
    message_id = str(uuid.uuid4())
    payload = temperature_message(device, 38.4, message_id=message_id, site="axillary")
    stop = asyncio.Event()
    ingest = asyncio.create_task(run(IngestSettings(), stop))
    try:
        async with device_account(stack_env, device) as password:
            # Subscribed: a new share group gets only what is published after it subscribed.
            await until_ready(metrics_port, what="ingest over TLS", tasks=[ingest])
            async with tls_client(port, ca_file, device, password, device) as client:
                await client.publish(
                    f"vigil/v1/dev/{device}/temperature", json.dumps(payload).encode(), qos=1
                )
            found = await read_telemetry(bootstrap, start, lambda d: d["device_id"] == device)
            conn = await asyncpg.connect(dsn)
            try:
                rows = await eventually(
                    lambda: conn.fetch(
                        "SELECT patient_id, value_c FROM temperature_readings WHERE device_id = $1",
                        device,
                    ),
                    timeout_s=30,
                    what="the reading to be stored",
                    interval_s=0.1,
                )
            finally:
                await conn.close()
    finally:
        stop.set()
        await asyncio.wait_for(ingest, 30)
        # Remove ingest's persistent session and its share group's subscription (over TLS too).
        async with aiomqtt.Client(
            "127.0.0.1",
            port,
            username=stack_env["VIGIL_INGEST_MQTT_USERNAME"],
            password=stack_env["VIGIL_INGEST_MQTT_PASSWORD"],
            identifier=client_id,
            clean_session=True,
            tls_params=aiomqtt.TLSParameters(ca_certs=ca_file),
        ):
            pass

    assert len(found) == 1, found
    record = found[0]
    assert record["patient_id"] == patient
    assert record["temperature_c"] == 38.4
    assert isinstance(record["message"], dict) and record["message"]["message_id"] == message_id
    assert [(r["patient_id"], r["value_c"]) for r in rows] == [(patient, 38.4)]
