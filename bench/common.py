"""Shared pieces of the benchmarks: the stack, a lean MQTT load generator, CPU, percentiles.

``QosOnePublisher`` speaks just enough MQTT 3.1.1 (CONNECT, PUBLISH QoS 1, PUBACK, DISCONNECT)
over an asyncio stream to publish pre-formatted payloads at a paced rate with a bounded window
of unacknowledged messages. The window is the back-pressure a naive paho publisher lacks: paho
queues without limit and wraps its 16-bit packet ids past 65,535 in-flight messages, then
stalls. A hand-rolled client also keeps the load generator's own CPU small next to the system
under test, on a machine with two cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
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


@dataclass
class QosOnePublisher:
    """One MQTT connection publishing QoS 1 with at most ``window`` unacknowledged messages."""

    host: str
    port: int
    client_id: str
    username: str
    password: str
    window: int = 500
    acked: int = 0
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None
    _slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))
    _next_id: int = 0
    _acks_task: asyncio.Task[None] | None = None
    _drained: asyncio.Event = field(default_factory=asyncio.Event)
    _in_flight: int = 0

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        body = (
            _string("MQTT")
            + bytes([4, 0x80 | 0x40 | 0x02])  # level 3.1.1; username, password, clean session
            + struct.pack("!H", 0)  # keep-alive off: a bench connection lives under a minute
            + _string(self.client_id)
            + _string(self.username)
            + _string(self.password)
        )
        self._writer.write(b"\x10" + _remaining_length(len(body)) + body)
        connack = await self._reader.readexactly(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise MqttRefused(f"CONNACK {connack.hex()}")
        self._slots = asyncio.Semaphore(self.window)
        self._acks_task = asyncio.create_task(self._read_acks())

    async def _read_acks(self) -> None:
        assert self._reader is not None
        while True:
            header = await self._reader.readexactly(2)
            length = header[1]
            if length & 0x80:  # PUBACKs are 2 bytes long; anything longer is not ours
                raise MqttRefused(f"unexpected packet {header.hex()}")
            await self._reader.readexactly(length)
            if header[0] >> 4 == 4:
                self.acked += 1
                self._in_flight -= 1
                self._slots.release()
                if self._in_flight == 0:
                    self._drained.set()

    async def publish(self, topic: str, payload: bytes) -> None:
        """Send one QoS 1 message; waits only when the window is full (back-pressure)."""
        assert self._writer is not None
        if self._acks_task is not None and self._acks_task.done():
            self._acks_task.result()
        await self._slots.acquire()
        self._next_id = self._next_id % 65535 + 1
        self._in_flight += 1
        self._drained.clear()
        variable = _string(topic) + struct.pack("!H", self._next_id)
        self._writer.write(
            b"\x32" + _remaining_length(len(variable) + len(payload)) + variable + payload
        )
        if self._in_flight % 64 == 0:
            await self._writer.drain()

    async def drain(self, timeout_s: float = 60.0) -> None:
        """Wait until every message sent has its PUBACK."""
        assert self._writer is not None
        await self._writer.drain()
        if self._in_flight:
            await asyncio.wait_for(self._drained.wait(), timeout_s)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.write(b"\xe0\x00")
            await self._writer.drain()
            self._writer.close()
        if self._acks_task is not None:
            self._acks_task.cancel()


async def paced(
    publishers: list[QosOnePublisher],
    make: Callable[[int], tuple[str, bytes]],
    rate: float,
    seconds: float,
    max_messages: int,
) -> tuple[int, float, float]:
    """Publish ``make(i)`` round-robin over the connections at ``rate`` per second (0: as fast
    as back-pressure allows) for ``seconds`` or ``max_messages``. Returns (sent, start, end)."""
    start = time.time()
    sent = 0
    deadline = time.monotonic() + seconds
    t0 = time.monotonic()
    while sent < max_messages and time.monotonic() < deadline:
        due = max_messages if rate <= 0 else min(max_messages, int((time.monotonic() - t0) * rate))
        if due <= sent:
            await asyncio.sleep(0.002)
            continue
        for _ in range(min(due - sent, 2000)):
            topic, payload = make(sent)
            await publishers[sent % len(publishers)].publish(topic, payload)
            sent += 1
        await asyncio.sleep(0)
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
    make: Callable[[int], tuple[str, bytes]],
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
    try:
        _, started, finished = await paced(
            publishers, make, rate, seconds, max_messages=int(rate * seconds) + 1
        )
    finally:
        done.set()
        await task
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
