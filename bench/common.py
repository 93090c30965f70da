"""Shared pieces of the benchmarks: the stack, a lean MQTT load generator, CPU, percentiles.

``QosOnePublisher`` speaks just enough MQTT 3.1.1 (CONNECT, PUBLISH QoS 1, PUBACK, DISCONNECT)
over an asyncio protocol to publish pre-formatted payloads at a paced rate with a bounded window
of unacknowledged messages. The window is the back-pressure a naive paho publisher lacks: paho
queues without limit and wraps its 16-bit packet ids past 65,535 in-flight messages, then
stalls. A hand-rolled client also keeps the load generator's own CPU small next to the system
under test, on a machine with two cores: ``paced`` asks for its messages a chunk at a time and
writes each connection's share of a chunk as one write (one send), and the PUBACKs are counted
from whole chunks of received bytes, not read one packet at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def stack_environment() -> dict[str, str]:
    """Start (or reuse) the local stack named by ``VIGIL_STACK_*`` and return its variables."""
    from vigil_tools.stack import StackSettings, up
    from vigil_tools.stack import stack_env as read_env

    settings = StackSettings()
    up(settings)
    env = read_env(settings)
    os.environ.update(env)
    return env


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class CpuMeter:
    """Machine-wide busy fraction and CPU seconds of chosen processes between two samples."""

    def __init__(self, pids: Iterable[int] = ()) -> None:
        self._pids = list(pids)
        self._tick = os.sysconf("SC_CLK_TCK")
        self._start_total = self._machine()
        self._start_procs = {pid: self._process(pid) for pid in self._pids}
        self._started = time.monotonic()

    @staticmethod
    def _machine() -> tuple[int, int, int]:
        """All CPU time since boot, its idle part, and its steal (time the hypervisor gave
        to other guests), in ticks. Guest time is counted inside user time, so it is left
        out of the sum."""
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4], fields[7]

    def _process(self, pid: int) -> float:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return 0.0
        parts = stat.rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / self._tick

    def stop(self) -> dict[str, float]:
        total, idle, steal = self._machine()
        start_total, start_idle, start_steal = self._start_total
        elapsed = max(1, total - start_total)
        busy = 1.0 - (idle - start_idle) / elapsed
        wall = time.monotonic() - self._started
        procs = sum(self._process(pid) - self._start_procs[pid] for pid in self._pids)
        return {
            "machine_busy_pct": round(100 * busy, 1),
            "machine_steal_pct": round(100 * (steal - start_steal) / elapsed, 1),
            "cores": os.cpu_count() or 0,
            "processes_cpu_pct_of_one_core": round(100 * procs / max(wall, 1e-9), 1),
        }


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


class MqttRefused(RuntimeError):
    pass


# A chunk of messages: (topic, payload) pairs, published in order.
Messages = Sequence[tuple[str, bytes]]
# What ``paced`` asks for: ``make(n)`` returns the next ``n`` messages.
MakeChunk = Callable[[int], list[tuple[str, bytes]]]

# Packet ids 1..65535 as their two bytes on the wire (index 0 unused).
_PACKET_IDS = [struct.pack("!H", i) for i in range(65536)]
# PUBLISH QoS 1 fixed headers (packet type, flags, remaining length), by remaining length.
_PUBLISH_HEADERS: dict[int, bytes] = {}


def _publish_header(remaining: int) -> bytes:
    header = _PUBLISH_HEADERS.get(remaining)
    if header is None:
        header = _PUBLISH_HEADERS[remaining] = b"\x32" + _remaining_length(remaining)
    return header


class PublishEncoder:
    """PUBLISH QoS 1 packets (no DUP, no RETAIN) for a sequence of messages, with packet ids
    counting 1..65535 and wrapping, as one ``bytes`` per chunk. Each packet is the same bytes
    as one written at a time; only the number of writes changes. Pure: no I/O."""

    def __init__(self) -> None:
        self.last_id = 0
        self._topics: dict[str, bytes] = {}

    def encode(self, messages: Messages) -> bytes:
        parts: list[bytes] = []
        add = parts.extend
        topics = self._topics
        ids = _PACKET_IDS
        packet_id = self.last_id
        for topic, payload in messages:
            name = topics.get(topic)
            if name is None:
                name = topics[topic] = _string(topic)
            packet_id = packet_id % 65535 + 1
            add((_publish_header(len(name) + 2 + len(payload)), name, ids[packet_id], payload))
        self.last_id = packet_id
        return b"".join(parts)


class PubAckCounter:
    """Counts the PUBACKs in the bytes a broker sends to a QoS 1 publisher, fed as they arrive
    (a packet may be split across chunks). A PUBACK of MQTT 3.1.1 is four bytes, 0x40 0x02 and
    the packet id; anything else (this publisher subscribes to nothing and sends no PINGREQ)
    raises ``MqttRefused``. Pure: no I/O."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> int:
        if self._partial:
            data = self._partial + data
        whole = len(data) - len(data) % 4
        count = whole // 4
        if data[0:whole:4].count(0x40) != count or data[1:whole:4].count(0x02) != count:
            bad = next(i for i in range(0, whole, 4) if data[i] != 0x40 or data[i + 1] != 0x02)
            raise MqttRefused(f"unexpected packet {data[bad : bad + 4].hex()}")
        partial = self._partial = data[whole:]
        if partial[:1] not in (b"", b"\x40") or partial[1:2] not in (b"", b"\x02"):
            raise MqttRefused(f"unexpected packet {partial.hex()}")
        return count


class _Connection(asyncio.Protocol):
    """The socket side of a ``QosOnePublisher``: the CONNACK, then PUBACKs counted from whole
    chunks of received bytes, and the transport's write flow control."""

    def __init__(self, owner: QosOnePublisher) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self.closing = False
        self._head = b""
        self._acks = PubAckCounter()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.connack.done():
            self._head += data
            if len(self._head) < 4:
                return
            data, self._head = self._head[4:], self._head[:4]
            self.connack.set_result(self._head)
        try:
            count = self._acks.feed(data)
        except MqttRefused as error:
            self.owner._fail(error)
            if self.transport is not None:
                self.transport.abort()
            return
        if count:
            self.owner._acked(count)

    def connection_lost(self, exc: Exception | None) -> None:
        error = exc or ConnectionError("the broker closed the connection")
        if not self.connack.done():
            self.connack.set_exception(error)
        if not self.closing:
            self.owner._fail(error)
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


@dataclass
class QosOnePublisher:
    """One MQTT connection publishing QoS 1 with at most ``window`` unacknowledged messages.

    ``publish`` writes one message at once (one ``transport.write``); ``publish_many`` writes a
    chunk of messages as one write (split only where the window is full). PUBACKs are counted
    from whole chunks of received bytes (``PubAckCounter``) into ``acked``."""

    host: str
    port: int
    client_id: str
    username: str
    password: str
    window: int = 500
    acked: int = 0
    _conn: _Connection | None = None
    _encoder: PublishEncoder = field(default_factory=PublishEncoder)
    _in_flight: int = 0
    _space: asyncio.Event = field(default_factory=asyncio.Event)
    _drained: asyncio.Event = field(default_factory=asyncio.Event)
    _error: BaseException | None = None

    async def connect(self) -> None:
        if not 1 <= self.window <= 65535:
            raise ValueError("window must be within 1..65535 (MQTT packet ids)")
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        self._conn = conn
        body = (
            _string("MQTT")
            + bytes([4, 0x80 | 0x40 | 0x02])  # level 3.1.1; username, password, clean session
            + struct.pack("!H", 0)  # keep-alive off: a bench connection lives under a minute
            + _string(self.client_id)
            + _string(self.username)
            + _string(self.password)
        )
        assert conn.transport is not None
        conn.transport.write(b"\x10" + _remaining_length(len(body)) + body)
        connack = await conn.connack
        if connack[0] != 0x20 or connack[3] != 0:
            conn.closing = True
            conn.transport.close()
            raise MqttRefused(f"CONNACK {connack.hex()}")
        self._space.set()
        self._drained.set()

    @property
    def unacknowledged(self) -> int:
        """Messages written and not yet acknowledged (at most ``window``)."""
        return self._in_flight

    def _acked(self, count: int) -> None:
        self.acked += count
        self._in_flight -= count
        if self._in_flight < self.window:
            self._space.set()
        if self._in_flight <= 0:
            self._drained.set()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        # Wake whoever waits, to raise it.
        self._space.set()
        self._drained.set()

    def _check(self) -> _Connection:
        if self._error is not None:
            raise self._error
        assert self._conn is not None and self._conn.transport is not None
        return self._conn

    async def publish(self, topic: str, payload: bytes) -> None:
        """Send one QoS 1 message now; waits only when the window is full (back-pressure)."""
        await self.publish_many(((topic, payload),))

    async def publish_many(self, messages: Messages) -> None:
        """Send ``messages`` in order, as one write while the window has room for them; when it
        is full, waits for PUBACKs and writes the rest as room frees (back-pressure)."""
        conn = self._check()
        start, total = 0, len(messages)
        while start < total:
            room = self.window - self._in_flight
            if room <= 0:
                self._space.clear()
                await self._space.wait()
                conn = self._check()
                continue
            end = min(total, start + room)
            data = self._encoder.encode(messages[start:end] if start or end < total else messages)
            self._in_flight += end - start
            self._drained.clear()
            assert conn.transport is not None
            conn.transport.write(data)
            start = end
            if not conn.writable.is_set():
                await conn.writable.wait()
                conn = self._check()

    async def drain(self, timeout_s: float = 60.0) -> None:
        """Wait until every message sent has its PUBACK."""
        conn = self._check()
        await conn.writable.wait()
        if self._in_flight > 0:
            await asyncio.wait_for(self._drained.wait(), timeout_s)
        self._check()

    async def close(self) -> None:
        conn = self._conn
        if conn is None or conn.transport is None or conn.transport.is_closing():
            return
        conn.closing = True
        conn.transport.write(b"\xe0\x00")
        await conn.writable.wait()
        conn.transport.close()


async def paced(
    publishers: list[QosOnePublisher],
    make: MakeChunk,
    rate: float,
    seconds: float,
    max_messages: int,
) -> tuple[int, float, float]:
    """Publish the messages ``make(n)`` returns, round-robin over the connections (message
    ``i`` on connection ``i % len(publishers)``), at ``rate`` per second (0: as fast as
    back-pressure allows) for ``seconds`` or ``max_messages``. Every 2 ms (a tick) what is
    due (at most 2,000) is asked of ``make`` as one chunk and written as one write per
    connection; at rate 0, chunks of 2,000 follow one another.
    Returns (sent, start, end), once every publisher has its PUBACKs."""
    start = time.time()
    sent = 0
    deadline = time.monotonic() + seconds
    t0 = time.monotonic()
    count = len(publishers)
    while sent < max_messages and time.monotonic() < deadline:
        due = max_messages if rate <= 0 else min(max_messages, int((time.monotonic() - t0) * rate))
        if due <= sent:
            await asyncio.sleep(0.002)
            continue
        chunk = make(min(due - sent, 2000))
        if count == 1:
            await publishers[0].publish_many(chunk)
        else:
            for k in range(count):
                await publishers[(sent + k) % count].publish_many(chunk[k::count])
        sent += len(chunk)
        # Paced, the next chunk is what falls due over the next tick, not the one or two
        # messages due by the time this one is written: a chunk per tick, not per message.
        await asyncio.sleep(0.002 if rate > 0 else 0)
    for publisher in publishers:
        await publisher.drain()
    return sent, start, time.time()


# --- capacity search --------------------------------------------------------------------------


@dataclass
class CapacitySearch:
    """Which offered load to try next, from the steps tried so far (pure: no clock, no I/O).

    Upward by ``factor`` from ``start`` until the first step that is not sustained; then, between
    the highest sustained rate and the lowest failed one above it, up to ``refine`` geometric
    midpoints. A failed start steps downward by ``factor`` until one is sustained. ``stop()``
    ends the search at once (after a loss: the system is no longer in a clean state).
    """

    start: float
    factor: float = 1.25
    refine: int = 2
    max_steps: int = 12
    ceiling: float | None = None
    tried: list[tuple[float, bool]] = field(default_factory=list)
    _refined: int = 0
    _stopped: bool = False

    def __post_init__(self) -> None:
        if self.start <= 0 or self.factor <= 1.0:
            raise ValueError("start must be positive and factor above 1")

    @property
    def best(self) -> float | None:
        """The highest sustained rate tried, None if none was."""
        return max((rate for rate, ok in self.tried if ok), default=None)

    def record(self, rate: float, sustained: bool) -> None:
        self.tried.append((rate, sustained))

    def stop(self) -> None:
        self._stopped = True

    def next_rate(self) -> float | None:
        if self._stopped or len(self.tried) >= self.max_steps:
            return None
        if not self.tried:
            return self.start
        best = self.best
        failed = [rate for rate, ok in self.tried if not ok]
        if best is None:
            return min(failed) / self.factor
        above = [rate for rate in failed if rate > best]
        if not above:
            nxt = best * self.factor
            if self.ceiling is not None and nxt > self.ceiling:
                return None if best >= self.ceiling else self.ceiling
            return nxt
        if self._refined >= self.refine:
            return None
        low, high = best, min(above)
        if high / low < 1.04:  # finer than the machine's own noise
            return None
        self._refined += 1
        return float((low * high) ** 0.5)


def backlog_growing(
    samples: list[tuple[float, int]], rate: float, tolerance_s: float = 0.5
) -> bool:
    """Whether the backlog (messages accepted and not yet through) grew during a step.

    ``samples`` are (seconds into the step, backlog). The mean backlog of the step's last
    quarter is compared with that of its second quarter; growth of more than ``tolerance_s``
    seconds of the offered load is a backlog the system is not working off. A backlog that only
    rises and falls with the batches stays well under it."""
    if len(samples) < 4:
        return False
    end = samples[-1][0]
    second = [b for t, b in samples if end / 4 <= t < end / 2]
    last = [b for t, b in samples if t >= 3 * end / 4]
    if not second or not last:
        return False
    growth = sum(last) / len(last) - sum(second) / len(second)
    return growth > tolerance_s * rate


async def load_step(
    publishers: list[QosOnePublisher],
    make: MakeChunk,
    rate: float,
    seconds: float,
    backlog: Callable[[int], Awaitable[int]],
    sample_every_s: float = 0.5,
) -> dict[str, Any]:
    """One step of a capacity search: ``rate`` offered for ``seconds`` through ``paced`` while
    ``backlog(acked since the step began)`` is sampled. Returns what was published and whether
    the backlog grew (``backlog_growing``)."""
    acked_before = sum(p.acked for p in publishers)
    samples: list[tuple[float, int]] = []
    began = time.monotonic()
    done = asyncio.Event()

    async def sampler() -> None:
        while not done.is_set():
            acked = sum(p.acked for p in publishers) - acked_before
            samples.append((time.monotonic() - began, await backlog(acked)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), sample_every_s)

    task = asyncio.create_task(sampler())
    cpu_before = time.process_time()
    try:
        _, started, finished = await paced(
            publishers, make, rate, seconds, max_messages=int(rate * seconds) + 1
        )
    finally:
        done.set()
        await task
    cpu_s = time.process_time() - cpu_before
    offered_s = max(finished - started, 1e-9)
    acked = sum(p.acked for p in publishers) - acked_before
    return {
        "offered_per_s": round(rate),
        "published": acked,
        "published_per_s": round(acked / offered_s),
        "publish_seconds": round(offered_s, 2),
        "backlog_mid": samples[len(samples) // 2][1] if samples else 0,
        "backlog_end": samples[-1][1] if samples else 0,
        "backlog_growing": backlog_growing(samples, rate),
        # paced() waits for every PUBACK: a broker or publisher that cannot take the load
        # stretches the step.
        "kept_pace": acked >= 0.95 * rate * seconds and offered_s <= 1.1 * seconds,
        # CPU time of this process through the step (the load generator, and the backlog
        # sampled twice a second) per message: what the generator takes from the cores.
        "generator_cpu_us_per_message": round(cpu_s / max(acked, 1) * 1e6, 2),
    }


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout_s: float, every_s: float = 0.25
) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await condition():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every_s)
