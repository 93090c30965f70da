"""The benchmarks' MQTT load generator: PUBLISH packets encoded a chunk at a time are the bytes
of the packets encoded one at a time, PUBACKs are counted whatever the split of the bytes
received, the window bounds what is unacknowledged, ``paced`` keeps its round-robin, and the
payload factory's message ids are unique and each device's seq rises."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import struct
from collections import defaultdict
from collections.abc import Sequence

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.common import (
    MqttRefused,
    PubAckCounter,
    PublishEncoder,
    QosOnePublisher,
    paced,
)
from bench.ingest import make_payload_factory
from schemas.device import TemperatureReading, parse_device_message


def one_publish(topic: str, packet_id: int, payload: bytes) -> bytes:
    """A PUBLISH QoS 1 packet built on its own, as the generator wrote one per message:
    fixed header 0x32, remaining length (7 bits a byte, low first), topic, packet id, payload."""
    name = topic.encode()
    variable = struct.pack("!H", len(name)) + name + struct.pack("!H", packet_id)
    n = len(variable) + len(payload)
    length = bytearray()
    while True:
        byte, n = n % 128, n // 128
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return b"\x32" + bytes(length) + variable + payload


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + struct.pack("!H", packet_id)


def test_chunks_encode_the_same_bytes_as_one_packet_at_a_time() -> None:
    rng = random.Random(7)
    topics = ["vigil/v1/dev/t-001/temperature", "vigil/v1/dev/é-002/pump-event", "a"]
    # Payload sizes around the remaining length's one-, two- and three-byte boundaries.
    sizes = [0, 1, 90, 91, 92, 93, 200, 16_340, 16_350, 16_400, 70_000]
    messages = [(rng.choice(topics), rng.randbytes(rng.choice(sizes))) for _ in range(1_500)]
    encoder = PublishEncoder()
    encoder.last_id = 65_000  # the packet ids wrap from 65,535 back to 1 inside the run
    chunks = []
    start = 0
    while start < len(messages):
        end = start + rng.randint(1, 300)
        chunks.append(encoder.encode(messages[start:end]))
        start = end
    expected = [
        one_publish(topic, (65_000 + i) % 65_535 + 1, payload)
        for i, (topic, payload) in enumerate(messages)
    ]
    assert b"".join(chunks) == b"".join(expected)
    assert encoder.last_id == (65_000 + len(messages) - 1) % 65_535 + 1
    assert encoder.encode([]) == b""


@given(
    ids=st.lists(st.integers(1, 65_535), max_size=60),
    cuts=st.lists(st.integers(0, 240), max_size=12),
)
def test_pubacks_are_counted_across_any_split(ids: list[int], cuts: list[int]) -> None:
    stream = b"".join(puback(i) for i in ids)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    counter = PubAckCounter()
    counted = [counter.feed(stream[a:b]) for a, b in itertools.pairwise(bounds)]
    assert sum(counted) == len(ids)
    # Each chunk counts exactly the PUBACKs completed by its last byte.
    assert [b // 4 for b in bounds[1:]] == [sum(counted[: k + 1]) for k in range(len(counted))]


def test_bytes_one_at_a_time_count_each_puback_on_its_last_byte() -> None:
    counter = PubAckCounter()
    stream = puback(1) + puback(0x4002) + puback(65_535)
    assert [counter.feed(stream[i : i + 1]) for i in range(len(stream))] == [0, 0, 0, 1] * 3


@pytest.mark.parametrize(
    "received",
    [
        puback(1) + b"\xd0\x00" + puback(2),  # PINGRESP
        puback(1) + b"\x30\x05\x00\x01a" + b"hi",  # a PUBLISH (this client subscribes to none)
        b"\x40\x03\x00\x01\x00",  # a PUBACK of the wrong length
        puback(1) + b"\x50",  # the start of a PUBREC, still incomplete
        puback(1) + b"\x40\x04",  # an incomplete PUBACK of the wrong length
    ],
)
def test_anything_but_a_puback_is_an_error(received: bytes) -> None:
    with pytest.raises(MqttRefused, match="unexpected packet"):
        PubAckCounter().feed(received)
    # The same bytes split in two: the error is found whichever chunk holds it.
    counter = PubAckCounter()
    with pytest.raises(MqttRefused, match="unexpected packet"):
        counter.feed(received[:3])
        counter.feed(received[3:])


class Broker:
    """A loopback server that takes one CONNECT, then PUBLISHes. It holds its PUBACKs until
    ``release`` is set, then acknowledges in batches of ``batch`` (and the last ones once
    ``total`` have come), each batch after ``garbage``. ``arrived`` is set once ``watch``
    PUBLISHes have come."""

    def __init__(self, total: int, batch: int = 7, garbage: bytes = b"", watch: int = 0) -> None:
        self.total, self.batch, self.garbage, self.watch = total, batch, garbage, watch
        self.received: list[tuple[str, int, bytes]] = []
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()
        self._unacked: list[int] = []
        self._writer: asyncio.StreamWriter | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        releaser = asyncio.create_task(self._released())
        # A client that drops the connection (as one fed garbage does) ends the exchange.
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await self.exchange(reader, writer)
        releaser.cancel()
        writer.close()

    async def _released(self) -> None:
        await self.release.wait()
        self._ack(everything=True)

    def _ack(self, everything: bool = False) -> None:
        done = len(self.received) == self.total
        if (
            self._unacked
            and self.release.is_set()
            and (everything or done or len(self._unacked) >= self.batch)
        ):
            assert self._writer is not None
            self._writer.write(self.garbage + b"".join(puback(i) for i in self._unacked))
            self._unacked.clear()

    async def exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.readexactly(2)
        await reader.readexactly(first[1])  # CONNECT (short: no multi-byte length here)
        writer.write(b"\x20\x02\x00\x00")
        while True:
            head = await reader.readexactly(1)
            if head == b"\xe0":  # DISCONNECT
                return
            assert head == b"\x32"
            length, shift = 0, 0
            while True:
                byte = (await reader.readexactly(1))[0]
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            body = await reader.readexactly(length)
            (size,) = struct.unpack("!H", body[:2])
            (packet_id,) = struct.unpack("!H", body[2 + size : 4 + size])
            self.received.append((body[2 : 2 + size].decode(), packet_id, body[4 + size :]))
            self._unacked.append(packet_id)
            if len(self.received) == self.watch:
                self.arrived.set()
            self._ack()


async def serve(broker: Broker) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(broker.handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_the_window_bounds_what_is_unacknowledged_and_every_puback_is_counted() -> None:
    window, total = 40, 130
    broker = Broker(total, watch=window)
    server, port = await serve(broker)
    messages = [(f"t/{i % 3}", f"m{i}".encode()) for i in range(total)]
    async with server:
        publisher = QosOnePublisher("127.0.0.1", port, "c", "u", "p", window=window)
        await publisher.connect()
        first = asyncio.create_task(publisher.publish_many(messages[:100]))
        await asyncio.wait_for(broker.arrived.wait(), 10)
        # Nothing acknowledged yet: the window's worth written, the rest waits for PUBACKs.
        assert publisher.unacknowledged == window and not first.done()
        broker.release.set()
        await first
        await publisher.publish(*messages[100])
        await publisher.publish_many(messages[101:])
        await publisher.drain(timeout_s=10)
        assert publisher.unacknowledged == 0
        await publisher.close()
    assert publisher.acked == total
    assert [(t, p) for t, _, p in broker.received] == messages
    assert [i for _, i, _ in broker.received] == list(range(1, total + 1))


async def test_a_packet_that_is_not_a_puback_fails_the_publisher() -> None:
    broker = Broker(total=5, garbage=b"\xd0\x00")
    broker.release.set()
    server, port = await serve(broker)
    async with server:
        publisher = QosOnePublisher("127.0.0.1", port, "c", "u", "p", window=5)
        await publisher.connect()
        await publisher.publish_many([("t", b"x")] * 5)
        with pytest.raises(MqttRefused, match="unexpected packet d000"):
            await publisher.drain(timeout_s=10)
        with pytest.raises(MqttRefused):
            await publisher.publish("t", b"y")
        await publisher.close()


class Recorder:
    """Stands in for a publisher in ``paced``: records what each connection was given."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.writes = 0
        self.drained = False

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        self.got.extend(messages)
        self.writes += 1

    async def drain(self) -> None:
        self.drained = True


async def test_paced_goes_round_robin_in_chunks_up_to_max_messages() -> None:
    recorders = [Recorder() for _ in range(3)]
    made = 0

    def make(n: int) -> list[tuple[str, bytes]]:
        nonlocal made
        chunk = [("t", str(i).encode()) for i in range(made, made + n)]
        made += n
        return chunk

    sent, start, end = await paced(recorders, make, 0, 30.0, 4_500)  # type: ignore[arg-type]
    assert sent == made == 4_500 and start <= end
    for k, recorder in enumerate(recorders):
        assert [int(p) for _, p in recorder.got] == list(range(k, 4_500, 3))
        assert recorder.drained
        # At most 2,000 messages a chunk, one write per connection per chunk.
        assert recorder.writes == 3


async def test_paced_keeps_the_rate() -> None:
    recorder = Recorder()
    sent, _, _ = await paced(
        [recorder],  # type: ignore[list-item]
        lambda n: [("t", b"x")] * n,
        rate=2_000,
        seconds=0.5,
        max_messages=10_000,
    )
    # Paced, not as fast as possible: never more than rate x seconds (fewer if the machine
    # stalls), where rate 0 would have sent all 10,000.
    assert sent <= 1_000
    assert len(recorder.got) == sent


def test_the_payload_factory_makes_unique_ids_and_rising_seqs_per_device() -> None:
    devices = [f"bench-t-{i:03d}" for i in range(7)]
    make = make_payload_factory(devices)
    chunks = [make(n) for n in (1, 13, 0, 50, 2_000, 3)]
    ids = set()
    seqs: dict[str, list[int]] = defaultdict(list)
    order = []
    for chunk in chunks:
        times = set()
        for topic, payload in chunk:
            reading = parse_device_message(payload)
            assert isinstance(reading, TemperatureReading)
            assert topic == f"vigil/v1/dev/{reading.device_id}/temperature"
            ids.add(reading.message_id)
            seqs[reading.device_id].append(reading.seq)
            order.append(reading.device_id)
            times.add(reading.device_time)
            assert orjson.loads(payload)["value"] == 37.2
        assert len(times) <= 1  # one device time per chunk
    total = sum(len(c) for c in chunks)
    assert len(ids) == total
    assert order == [devices[i % len(devices)] for i in range(total)]
    for device_seqs in seqs.values():
        assert device_seqs == list(range(1, len(device_seqs) + 1))
    # Another factory (another run) never repeats an id of this one.
    other = {parse_device_message(p).message_id for _, p in make_payload_factory(devices)(100)}
    assert not other & ids
