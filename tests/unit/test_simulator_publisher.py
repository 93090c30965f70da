"""The publisher loop against a fake broker: back-pressure, counts, order, stop and failure."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import aiomqtt
import pytest

from schemas.device import parse_device_message
from vigil_tools.simulator import Fleet, ScenarioTiming, parse_scenario_spec
from vigil_tools.simulator.publisher import PUBLISHED, PublishFailed, publish_fleet

START = datetime(2025, 3, 1, 2, 0, tzinfo=UTC)


class FakeBroker:
    """Acknowledges each publish after a random short delay and records the call order."""

    def __init__(self, *, seed: int = 0, fail_after: int | None = None) -> None:
        self.calls: list[tuple[str, bytes, int]] = []
        self.acked = 0
        self.inflight = 0
        self.max_inflight = 0
        self._rng = random.Random(seed)
        self._fail_after = fail_after

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        self.calls.append((topic, payload, qos))
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            # Out-of-order acknowledgements, as a broker under load may give.
            for _ in range(self._rng.randrange(4)):
                await asyncio.sleep(0)
            if self._fail_after is not None and len(self.calls) > self._fail_after:
                raise aiomqtt.MqttError("connection lost")
        finally:
            self.inflight -= 1
        self.acked += 1


def virtual_clock(step: timedelta) -> Callable[[], datetime]:
    """A clock that moves ``step`` further on every reading, so no test waits in real time."""
    ticks = 0

    def now() -> datetime:
        nonlocal ticks
        ticks += 1
        return START + step * ticks

    return now


def fleet(patients: int = 50) -> Fleet:
    return Fleet(
        parse_scenario_spec("fever:1,occlusion:1,normal:rest", patients),
        start=START,
        interval_s=1.0,
        seed=1,
        timing=ScenarioTiming(fever_onset_s=5.0, occlusion_after_s=10.0),
    )


async def test_never_more_than_max_inflight_unacknowledged() -> None:
    """With bursts of 200 messages at once, unacknowledged publishes never exceed the bound."""
    broker = FakeBroker(seed=1)
    counts = await publish_fleet(
        broker,
        fleet(100),
        asyncio.Event(),
        max_inflight=8,
        deadline=START + timedelta(seconds=60),
        clock=virtual_clock(timedelta(seconds=1)),
    )
    assert counts[PUBLISHED] > 5_000
    assert broker.max_inflight == 8
    assert broker.inflight == 0


async def test_counts_are_what_the_broker_acknowledged_per_channel() -> None:
    """The returned counts equal the acknowledged publishes, per channel and in total."""
    broker = FakeBroker(seed=2)
    counts = await publish_fleet(
        broker,
        fleet(5),
        asyncio.Event(),
        qos=1,
        max_inflight=4,
        deadline=START + timedelta(seconds=30),
        clock=virtual_clock(timedelta(seconds=1)),
    )
    by_channel = Counter(topic.rsplit("/", 1)[1] for topic, _, _ in broker.calls)
    assert counts[PUBLISHED] == broker.acked == len(broker.calls)
    assert {k: v for k, v in counts.items() if k != PUBLISHED} == {
        "temperature": by_channel["temperature"],
        "pump-status": by_channel["pump-status"],
        "pump-event": by_channel["pump-event"],
    }
    assert counts["pump-event"] == 1, "the occlusion alarm went out"
    assert {qos for _, _, qos in broker.calls} == {1}


async def test_each_device_publishes_in_seq_order() -> None:
    """Concurrent publishes still reach the client in each device's seq order."""
    broker = FakeBroker(seed=3)
    await publish_fleet(
        broker,
        fleet(20),
        asyncio.Event(),
        max_inflight=16,
        deadline=START + timedelta(seconds=30),
        clock=virtual_clock(timedelta(seconds=1)),
    )
    seqs: dict[str, list[int]] = defaultdict(list)
    for _, payload, _ in broker.calls:
        message = parse_device_message(payload)
        seqs[message.device_id].append(message.seq)
    assert len(seqs) == 40
    for device_id, numbers in seqs.items():
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), device_id


async def test_stop_ends_the_run_and_waits_for_outstanding_acks() -> None:
    """Setting stop ends publishing; publishes already in flight are awaited and counted."""
    stop = asyncio.Event()
    broker = FakeBroker(seed=4)
    original = broker.publish

    async def publish_then_stop(topic: str, payload: bytes, qos: int) -> None:
        if len(broker.calls) >= 500:
            stop.set()
        await original(topic, payload, qos)

    broker.publish = publish_then_stop  # type: ignore[method-assign]
    counts = await publish_fleet(
        broker, fleet(100), stop, max_inflight=32, clock=virtual_clock(timedelta(seconds=1))
    )
    assert 500 <= counts[PUBLISHED] < 1000
    assert counts[PUBLISHED] == broker.acked == len(broker.calls)


async def test_a_failed_publish_raises_one_mqtt_error() -> None:
    """A publish that fails ends the run with PublishFailed (an MqttError), not a task group."""
    broker = FakeBroker(seed=5, fail_after=50)
    with pytest.raises(PublishFailed, match="connection lost") as raised:
        await publish_fleet(
            broker,
            fleet(10),
            asyncio.Event(),
            max_inflight=4,
            deadline=START + timedelta(seconds=60),
            clock=virtual_clock(timedelta(seconds=1)),
        )
    assert isinstance(raised.value, aiomqtt.MqttError)


async def test_real_clock_run_stops_at_the_deadline() -> None:
    """With the wall clock, a run stops at its deadline and publishes each device's readings."""
    broker = FakeBroker(seed=6)
    start = datetime.now(UTC)
    small = Fleet(parse_scenario_spec("normal:rest", 2), start=start, interval_s=0.1, seed=1)
    counts = await publish_fleet(
        broker, small, asyncio.Event(), deadline=start + timedelta(seconds=0.5)
    )
    elapsed = (datetime.now(UTC) - start).total_seconds()
    assert 0.5 <= elapsed < 1.5
    # Four devices, each due every 0.1 s for 0.5 s.
    assert 16 <= counts[PUBLISHED] <= 24
