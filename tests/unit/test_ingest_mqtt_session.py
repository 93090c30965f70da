"""Ingest's MQTT 5 connection (adapters/mqtt_session.py) against a scripted broker on a local
socket: what it sends, what it makes of what the broker sends, and how it ends. The same client
against a real Mosquitto: tests/integration/test_ingest_mqtt_session_broker.py."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from services.ingest.adapters.mqtt_codec import (
    decode_properties,
    encode_variable_int,
    split_packets,
)
from services.ingest.adapters.mqtt_session import MqttError, MqttSession, SessionOptions
from services.ingest.entrypoints.consumer import batch_linger_s, next_batch
from services.ingest.settings import IngestSettings


def publish(topic: str, payload: bytes, mid: int, qos: int = 1) -> bytes:
    body = struct.pack("!H", len(topic)) + topic.encode()
    if qos:
        body += struct.pack("!H", mid)
    body += b"\x00" + payload
    return bytes([0x30 | (qos << 1)]) + encode_variable_int(len(body)) + body


def connack(reason: int = 0, properties: bytes = b"") -> bytes:
    body = bytes((0, reason)) + encode_variable_int(len(properties)) + properties
    return b"\x20" + encode_variable_int(len(body)) + body


@dataclass
class Broker:
    """One scripted broker connection: every packet the client sent, and a writer to answer."""

    port: int
    packets: asyncio.Queue[tuple[int, bytes]] = field(default_factory=asyncio.Queue)
    writer: asyncio.StreamWriter | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def next(self, kind: int | None = None, timeout_s: float = 5.0) -> tuple[int, bytes]:
        """The next packet the client sent (skipping PINGREQs unless asked for)."""
        while True:
            first, body = await asyncio.wait_for(self.packets.get(), timeout_s)
            if kind is None and first == 0xC0:
                continue
            if kind is not None and first != kind and first == 0xC0:
                continue
            return first, body

    def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    state: dict[str, Broker] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        b = state["broker"]
        b.writer = writer
        b.connected.set()
        buffer = bytearray()
        while chunk := await reader.read(65536):
            buffer += chunk
            packets, consumed = split_packets(buffer)
            del buffer[:consumed]
            for packet in packets:
                b.packets.put_nowait(packet)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    state["broker"] = Broker(port)
    async with server:
        yield state["broker"]
        if state["broker"].writer is not None:
            state["broker"].writer.close()


def options(port: int, **overrides: object) -> SessionOptions:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "client_id": "vigil-ingest-1",
        "username": "vigil-ingest",
        "password": "pw",
        "keepalive_s": 30,
        "session_expiry_s": 3600,
        "receive_maximum": 2000,
        "timeout_s": 2.0,
    }
    values.update(overrides)
    return SessionOptions(**values)  # type: ignore[arg-type]


async def arrived(session: MqttSession, count: int, timeout_s: float = 5.0) -> None:
    """Wait until ``count`` messages are waiting (fails on a lost connection or the timeout)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(session) < count:
        assert not session.disconnected.done(), session.lost_reason
        assert asyncio.get_running_loop().time() < deadline, f"{len(session)} of {count} arrived"
        if len(session):
            await asyncio.sleep(0.01)  # wait() returns at once while a message is waiting
        else:
            await session.wait(0.5)


async def connected(
    broker: Broker, connack_bytes: bytes | None = None, **kw: object
) -> MqttSession:
    opening = asyncio.ensure_future(MqttSession.open(options(broker.port, **kw)))
    first, _ = await broker.next(0x10)
    assert first == 0x10
    broker.send(connack_bytes or connack())
    return await opening


async def test_connects_subscribes_and_reads_messages_in_order(broker: Broker) -> None:
    """CONNACK then SUBACK complete the handshake; PUBLISHes cut anywhere across writes arrive
    whole, once, in order, with their packet ids (0 for QoS 0)."""
    session = await connected(broker)
    subscribing = asyncio.ensure_future(session.subscribe("$share/g/vigil/v1/dev/#", 1))
    first, body = await broker.next()
    assert first == 0x82
    packet_id = struct.unpack("!H", body[:2])[0]
    assert body[2:].endswith(b"$share/g/vigil/v1/dev/#\x01")
    broker.send(b"\x90\x04" + struct.pack("!H", packet_id) + b"\x00\x01")
    assert await subscribing == 1
    stream = (
        publish("vigil/v1/dev/d1/temperature", b"1", 1)
        + publish("vigil/v1/dev/d1/temperature", b"2" * 300, 2)
        + publish("vigil/v1/dev/d2/heartbeat", b"3", 0, qos=0)
    )
    for cut in (3, 200):
        broker.send(stream[:cut])
        stream = stream[cut:]
        await asyncio.sleep(0.01)
    broker.send(stream)
    await arrived(session, 3)
    assert session.take(2) == [
        ("vigil/v1/dev/d1/temperature", b"1", 1),
        ("vigil/v1/dev/d1/temperature", b"2" * 300, 2),
    ]
    assert session.take(10) == [("vigil/v1/dev/d2/heartbeat", b"3", 0)]
    await session.close()


async def test_ack_writes_the_pubacks_of_a_batch_in_its_order(broker: Broker) -> None:
    """A batch's PUBACKs go out in its order; QoS 0 messages get none."""
    session = await connected(broker)
    session.ack([5, 0, 6, 7])
    for mid in (5, 6, 7):
        first, body = await broker.next()
        assert (first, body) == (0x40, struct.pack("!H", mid))
    await session.close()
    first, _ = await broker.next(0xE0)
    assert first == 0xE0  # a normal DISCONNECT: the broker keeps the session


async def test_a_refused_connection_raises_with_the_reason(broker: Broker) -> None:
    with pytest.raises(MqttError, match="Not authorized"):
        await connected(broker, connack(0x87))


async def test_a_refused_subscription_raises(broker: Broker) -> None:
    session = await connected(broker)
    subscribing = asyncio.ensure_future(session.subscribe("vigil/v1/dev/#", 1))
    _, body = await broker.next()
    broker.send(b"\x90\x04" + body[:2] + b"\x00\x87")
    with pytest.raises(MqttError, match="refused: Not authorized"):
        await subscribing
    await session.close()


async def test_qos2_publish_drops_the_connection(broker: Broker) -> None:
    """The subscription is QoS 1: a QoS 2 PUBLISH is a protocol error, the connection is closed
    (the broker redelivers) and the message is not taken without its QoS 2 handshake."""
    session = await connected(broker)
    broker.send(publish("t/a", b"p", 9, qos=2))
    await asyncio.wait_for(asyncio.shield(session.disconnected), 2.0)
    assert len(session) == 0
    assert session.lost_reason is not None and "QoS 2" in session.lost_reason
    assert not session.connected
    session.ack([9])  # nothing to write to: no error
    await session.close()


async def test_messages_read_before_a_loss_are_kept(broker: Broker) -> None:
    """When the broker closes the connection, complete messages already read stay to be taken
    (made durable before reconnecting); a waiter wakes at once."""
    session = await connected(broker)
    broker.send(publish("t/a", b"p", 4) + publish("t/a", b"q", 5)[:4])
    await arrived(session, 1)
    assert broker.writer is not None
    broker.writer.close()
    await asyncio.wait_for(asyncio.shield(session.disconnected), 2.0)
    await session.wait(5.0)  # returns at once
    assert session.take(10) == [("t/a", b"p", 4)]
    assert session.lost_reason == "connection closed by the broker"


async def test_a_broker_disconnect_names_its_reason(broker: Broker) -> None:
    session = await connected(broker)
    broker.send(b"\xe0\x01\x8e")
    await asyncio.wait_for(asyncio.shield(session.disconnected), 2.0)
    assert session.lost_reason == "disconnected by the broker: Session taken over"


async def test_keep_alive_pings_and_drops_a_silent_broker(broker: Broker) -> None:
    """A PINGREQ every keep-alive interval (the broker's Server Keep Alive overrides ours); no
    answer within the next interval drops the connection."""
    session = await connected(broker, connack(0, b"\x13\x00\x01"), keepalive_s=30)
    first, _ = await broker.next(0xC0)
    assert first == 0xC0
    broker.send(b"\xd0\x00")  # PINGRESP
    first, _ = await broker.next(0xC0, timeout_s=3.0)
    assert first == 0xC0 and session.connected
    await asyncio.wait_for(asyncio.shield(session.disconnected), 3.0)
    assert session.lost_reason is not None and "keep-alive" in session.lost_reason


async def test_wait_holds_no_message_when_cancelled(broker: Broker) -> None:
    """Cancelling a wait loses nothing: messages are only ever taken by ``take``."""
    session = await connected(broker)
    waiting = asyncio.ensure_future(session.wait(5.0))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    broker.send(publish("t/a", b"q", 5))
    await arrived(session, 1)
    assert session.take(10) == [("t/a", b"q", 5)]
    await session.close()


async def test_publish_stays_within_the_broker_receive_maximum(broker: Broker) -> None:
    """QoS 1 answers: no more unacknowledged than the CONNACK's Receive Maximum; the rest wait
    and go as PUBACKs free their slots. Not connected: publish says so."""
    session = await connected(broker, connack(0, b"\x21\x00\x02"))
    assert all(session.publish(f"vigil/v1/ack/d{i}", b"{}") for i in range(3))
    assert session.backlog() == 3
    ids = []
    for _ in range(2):
        first, body = await broker.next()
        assert first == 0x32
        topic_end = 2 + struct.unpack("!H", body[:2])[0]
        ids.append(struct.unpack("!H", body[topic_end : topic_end + 2])[0])
    assert broker.packets.empty()
    broker.send(b"\x40\x02" + struct.pack("!H", ids[0]))
    first, body = await broker.next()
    assert first == 0x32 and body[2:16] == b"vigil/v1/ack/d"
    assert session.backlog() == 2
    await session.close()
    assert not session.publish("vigil/v1/ack/d9", b"{}")


async def test_connect_sends_the_session_properties(broker: Broker) -> None:
    opening = asyncio.ensure_future(MqttSession.open(options(broker.port, receive_maximum=1500)))
    _, body = await broker.next(0x10)
    properties, _ = decode_properties(body, 10)
    assert properties == {0x11: 3600, 0x21: 1500}
    assert body[7] & 0x02 == 0  # clean start off
    broker.send(connack())
    await (await opening).close()


async def test_no_connack_times_out(broker: Broker) -> None:
    with pytest.raises(MqttError, match="no CONNACK"):
        await MqttSession.open(options(broker.port, timeout_s=0.2))


async def test_nothing_listening_is_an_os_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(OSError):
        await MqttSession.open(options(port))


async def test_batches_are_cut_by_size_and_end_with_the_connection(broker: Broker) -> None:
    """The consumer loop's batching: at most ``batch_max`` messages; what was read before a
    loss is still handed out; then the loss is raised (and ingest reconnects)."""
    session = await connected(broker)
    stop = asyncio.Event()
    broker.send(b"".join(publish("t/a", b"p", mid) for mid in range(1, 6)))
    await arrived(session, 5)
    assert [m[2] for m in await next_batch(session, 3, 0.01, stop)] == [1, 2, 3]
    assert broker.writer is not None
    broker.writer.close()
    await asyncio.wait_for(asyncio.shield(session.disconnected), 2.0)
    assert [m[2] for m in await next_batch(session, 3, 0.01, stop)] == [4, 5]
    with pytest.raises(MqttError, match="closed by the broker"):
        await next_batch(session, 3, 0.01, stop)
    await session.close()


async def test_an_idle_batch_wait_ends_when_stopped(broker: Broker) -> None:
    session = await connected(broker)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stop.set)
    assert await asyncio.wait_for(next_batch(session, 10, 0.01, stop), 2.0) == []
    await session.close()


def test_a_batch_lingers_only_behind_batches_still_being_made_durable() -> None:
    settings = IngestSettings(batch_linger_ms=10)
    assert batch_linger_s(settings, batches_working=0) == 0.0
    assert batch_linger_s(settings, batches_working=1) == 0.01
    assert batch_linger_s(settings, batches_working=3) == 0.01


async def test_a_lone_message_goes_at_once_and_a_busy_stream_gathers(broker: Broker) -> None:
    """With no linger (nothing in flight) a batch is what has arrived, even when more is on its
    way; with one (batches in flight) the messages arriving within it join the batch."""
    session = await connected(broker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    broker.send(publish("t/a", b"p", 1))
    await arrived(session, 1)
    loop.call_later(0.05, broker.send, publish("t/a", b"p", 2))
    assert [m[2] for m in await next_batch(session, 10, 0.0, stop)] == [1]
    await arrived(session, 1)  # the second one did come: the batch did not wait for it
    assert [m[2] for m in await next_batch(session, 10, 0.0, stop)] == [2]
    broker.send(publish("t/a", b"p", 3))
    await arrived(session, 1)
    loop.call_later(0.05, broker.send, publish("t/a", b"p", 4))
    # A batch of at most 2 with a long linger: it waits for the fourth, then is full.
    assert [m[2] for m in await next_batch(session, 2, 5.0, stop)] == [3, 4]
    await session.close()
