"""Ingest's own MQTT 5 client (services/ingest/adapters/mqtt_session.py) against the real
Mosquitto: the persistent session keeps what was not acknowledged, a shared subscription splits
the stream, answers are acknowledged by the broker, TLS with the stack's CA."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import uuid
from pathlib import Path

import aiomqtt
import certifi
import pytest

from services.ingest.adapters.mqtt_session import MqttError, MqttSession, SessionOptions
from services.ingest.service_layer.ports import InboundMessage

pytestmark = pytest.mark.stack


def ingest_options(env: dict[str, str], client_id: str, **overrides: object) -> SessionOptions:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": int(env["VIGIL_MQTT_PORT"]),
        "client_id": client_id,
        "username": env["VIGIL_INGEST_MQTT_USERNAME"],
        "password": env["VIGIL_INGEST_MQTT_PASSWORD"],
        "keepalive_s": 30,
        "session_expiry_s": 300,
        "receive_maximum": 100,
    }
    values.update(overrides)
    return SessionOptions(**values)  # type: ignore[arg-type]


async def publish(env: dict[str, str], topic: str, payloads: list[bytes]) -> None:
    """QoS 1 as a device gateway would, each acknowledged by the broker before returning."""
    async with aiomqtt.Client(
        "127.0.0.1",
        int(env["VIGIL_MQTT_PORT"]),
        username=env["VIGIL_SIM_MQTT_USERNAME"],
        password=env["VIGIL_SIM_MQTT_PASSWORD"],
        identifier=f"session-test-pub-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        for payload in payloads:
            await client.publish(topic, payload, qos=1)


async def receive(
    session: MqttSession, count: int, timeout_s: float = 10.0
) -> list[InboundMessage]:
    """Exactly ``count`` messages (fails on a timeout or a lost connection)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    got: list[InboundMessage] = []
    while len(got) < count:
        assert not session.disconnected.done(), session.lost_reason
        remaining = deadline - loop.time()
        assert remaining > 0, f"{len(got)} of {count} messages arrived"
        await session.wait(remaining)
        got.extend(session.take(count - len(got)))
    return got


async def quiet(session: MqttSession, seconds: float = 0.5) -> list[InboundMessage]:
    """What else arrives within ``seconds`` (expected: nothing)."""
    await session.wait(seconds)
    return session.take(100)


async def test_unacknowledged_messages_come_back_on_the_next_connection(
    stack_env: dict[str, str],
) -> None:
    """The delivery contract's MQTT half: a message read but not acknowledged is redelivered to
    the persistent session on reconnection, with what was published meanwhile; an acknowledged
    one is not."""
    run = uuid.uuid4().hex[:8]
    topic = f"vigil/v1/dev/session-{run}/temperature"
    options = ingest_options(stack_env, f"vigil-ingest-session-{run}")
    session = await MqttSession.open(options)
    await session.subscribe(f"vigil/v1/dev/session-{run}/#", 1)
    await publish(stack_env, topic, [b"one", b"two"])
    first, second = await receive(session, 2)
    assert (first[0], first[1], second[1]) == (topic, b"one", b"two")
    assert first[2] and second[2] and first[2] != second[2]
    session.ack([first[2]])
    await session.close()
    await publish(stack_env, topic, [b"three"])
    session = await MqttSession.open(options)
    try:
        # The session survived: no SUBSCRIBE needed for the redelivery and the new message.
        again = await receive(session, 2)
        assert [payload for _, payload, _ in again] == [b"two", b"three"]
        session.ack([mid for _, _, mid in again])
        assert await quiet(session) == []
    finally:
        await session.close()
    # Acknowledged on the broker too: a third connection gets nothing back.
    session = await MqttSession.open(options)
    try:
        assert await quiet(session) == []
    finally:
        await session.close()


async def test_a_shared_subscription_splits_the_stream(stack_env: dict[str, str]) -> None:
    """Two sessions in one share group: every message reaches exactly one of them."""
    run = uuid.uuid4().hex[:8]
    topic = f"vigil/v1/dev/share-{run}/temperature"
    sessions = [
        await MqttSession.open(ingest_options(stack_env, f"vigil-ingest-share-{run}-{k}"))
        for k in range(2)
    ]
    try:
        for session in sessions:
            await session.subscribe(f"$share/g-{run}/vigil/v1/dev/share-{run}/#", 1)
        payloads = [f"m{i}".encode() for i in range(20)]
        await publish(stack_env, topic, payloads)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        got: list[list[InboundMessage]] = [[], []]
        while sum(map(len, got)) < len(payloads) and loop.time() < deadline:
            for k, session in enumerate(sessions):
                await session.wait(0.05)
                taken = session.take(100)
                session.ack([mid for _, _, mid in taken])
                got[k].extend(taken)
        received = sorted(payload for part in got for _, payload, _ in part)
        assert received == sorted(payloads)
        assert all(got)  # both members got a share
    finally:
        for session in sessions:
            await session.close()


async def test_answers_are_acknowledged_by_the_broker(stack_env: dict[str, str]) -> None:
    """QoS 1 PUBLISH out (the answers to devices, which only ingest may write): the broker
    acknowledges each with success, and the connection's backlog empties."""
    run = uuid.uuid4().hex[:8]
    session = await MqttSession.open(ingest_options(stack_env, f"vigil-ingest-answers-{run}"))
    try:
        for i in range(250):  # beyond a receive maximum of 100 would be queued, then sent
            assert session.publish(f"vigil/v1/ack/answers-{run}-{i % 5}", f"a{i}".encode())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while session.backlog() and loop.time() < deadline:
            await session.wait(0.05)
        assert session.backlog() == 0
        assert session.publishes_refused == 0
        assert session.connected
    finally:
        await session.close()


async def test_wrong_password_is_refused(stack_env: dict[str, str]) -> None:
    options = ingest_options(stack_env, f"vigil-ingest-refused-{uuid.uuid4().hex[:8]}")
    with pytest.raises(MqttError, match="refused"):
        await MqttSession.open(dataclasses.replace(options, password="not-the-password"))


async def test_tls_with_the_stack_ca(stack_env: dict[str, str]) -> None:
    """Over the TLS listener with the stack's CA: connected and subscribed; without trusting
    that CA the handshake fails before any credential is sent."""
    run = uuid.uuid4().hex[:8]
    port = int(stack_env["VIGIL_MQTT_TLS_PORT"])
    ca = Path(stack_env["VIGIL_MQTT_TLS_CA_FILE"])
    options = ingest_options(stack_env, f"vigil-ingest-tls-{run}", port=port, tls_ca_file=ca)
    session = await MqttSession.open(options)
    try:
        await session.subscribe(f"vigil/v1/dev/tls-{run}/#", 1)
        await publish(stack_env, f"vigil/v1/dev/tls-{run}/temperature", [b"over tls"])
        [(_, payload, mid)] = await receive(session, 1)
        assert payload == b"over tls"
        session.ack([mid])
    finally:
        await session.close()
    # A bundle of public CAs, none of which signed the stack's test certificate.
    public_cas = Path(certifi.where())
    with pytest.raises(ssl.SSLCertVerificationError):
        await MqttSession.open(dataclasses.replace(options, tls_ca_file=public_cas))
