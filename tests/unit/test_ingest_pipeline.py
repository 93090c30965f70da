"""Ingest's service layer (service_layer/pipeline.py) driven with in-memory fakes: a fake Kafka
producer, a fake store and a fake broker acknowledger. What is produced, stored and acknowledged,
in which order, and what a failure of Kafka or the database leaves to the retry."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Collection, Iterable, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from schemas.events import DeadLetter, Telemetry
from services.ingest.adapters.metrics import IngestMetrics
from services.ingest.domain.admission import Admission, DeviceSeen
from services.ingest.domain.registry import Binding, BindingIndex
from services.ingest.domain.validation import ValidationLimits
from services.ingest.service_layer.answers import AckPublisher
from services.ingest.service_layer.pipeline import (
    InFlight,
    IngestPipeline,
    PipelineConfig,
    acknowledge_in_order,
)
from services.ingest.service_layer.ports import InboundMessage

NOW = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)
SINCE = NOW - timedelta(days=10)
BINDINGS = [
    Binding("thermo-1", "P-0001", SINCE, None),
    Binding("thermo-2", "P-0002", SINCE, None),
    Binding("heartbeat-pipeline", "P-TECH", SINCE, None),
]


def reading(device: str = "thermo-1", seq: int = 1) -> tuple[str, bytes]:
    payload = {
        "schema": "vigil.device.temperature.v1",
        "message_id": str(uuid.uuid4()),
        "device_id": device,
        "seq": seq,
        "device_time": (NOW - timedelta(seconds=5)).isoformat(),
        "value": 37.1,
    }
    return f"vigil/v1/dev/{device}/temperature", json.dumps(payload).encode()


def heartbeat(seq: int = 1) -> tuple[str, bytes]:
    payload = {
        "schema": "vigil.device.heartbeat.v1",
        "message_id": str(uuid.uuid4()),
        "device_id": "heartbeat-pipeline",
        "seq": seq,
        "device_time": (NOW - timedelta(seconds=1)).isoformat(),
    }
    return "vigil/v1/dev/heartbeat-pipeline/heartbeat", json.dumps(payload).encode()


class KafkaDown(Exception):
    pass


class FakeProducer:
    """Kafka as the pipeline sees it: one produce batch per record here; ``fail`` refuses the
    next so many records (their futures fail), as a partition leader that is away would."""

    def __init__(self) -> None:
        self.telemetry: list[Telemetry] = []
        self.dead: list[DeadLetter] = []
        self.everywhere: list[set[Telemetry]] = []
        self.fail = 0

    def _outcome(self) -> asyncio.Future[object]:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if self.fail:
            self.fail -= 1
            future.set_exception(KafkaDown("not enough replicas"))
        else:
            future.set_result(None)
        return future

    async def send_telemetry(
        self, records: Iterable[tuple[int, Telemetry]], everywhere: Collection[int] = ()
    ) -> Sequence[tuple[list[int], Awaitable[object]]]:
        sent: list[tuple[list[int], Awaitable[object]]] = []
        spread: set[Telemetry] = set()
        for index, telemetry in records:
            future = self._outcome()
            if future.exception() is None:
                self.telemetry.append(telemetry)
                if index in everywhere:
                    spread.add(telemetry)
            sent.append(([index], future))
        self.everywhere.append(spread)
        return sent

    async def send_dead_letter(self, dead: DeadLetter) -> Awaitable[object]:
        future = self._outcome()
        if future.exception() is None:
            self.dead.append(dead)
        return future


class FakeStore:
    """PostgreSQL as the pipeline sees it: a unique key per (device, message id)."""

    def __init__(self, bindings: Sequence[Binding] = BINDINGS) -> None:
        self.bindings = list(bindings)
        self.loads = 0
        self.rows: dict[tuple[str, uuid.UUID], Telemetry] = {}
        self.writes = 0
        self.fail = 0
        self.seen: list[DeviceSeen] = []
        self.fail_seen = 0
        self.failed = asyncio.Event()

    async def load_bindings(self) -> BindingIndex:
        self.loads += 1
        return BindingIndex(self.bindings)

    async def store_telemetry(self, accepted: Sequence[Telemetry]) -> int:
        if self.fail:
            self.fail -= 1
            self.failed.set()
            raise ConnectionError("database unavailable")
        self.writes += 1
        new = 0
        for t in accepted:
            key = (t.device_id, t.message.message_id)
            if t.message.schema_ != "vigil.device.heartbeat.v1" and key not in self.rows:
                self.rows[key] = t
                new += 1
        return new

    async def store_last_seen(self, seen: Sequence[DeviceSeen]) -> None:
        if self.fail_seen:
            self.fail_seen -= 1
            raise ConnectionError("database unavailable")
        self.seen.extend(seen)


class FakeAcker:
    def __init__(self) -> None:
        self.acked: list[int] = []

    def ack(self, packet_ids: Sequence[int]) -> None:
        self.acked.extend(mid for mid in packet_ids if mid)


def make(
    producer: FakeProducer | None = None,
    store: FakeStore | None = None,
    answers: AckPublisher | None = None,
    metrics: IngestMetrics | None = None,
) -> tuple[IngestPipeline, FakeProducer, FakeStore]:
    producer = producer or FakeProducer()
    store = store or FakeStore()
    config = PipelineConfig(limits=ValidationLimits(), retry_min_s=0.01, retry_max_s=0.02)
    pipeline = IngestPipeline(
        config, producer, store, metrics=metrics, answers=answers, clock=lambda: NOW
    )
    return pipeline, producer, store


def sample(pipeline: IngestPipeline, name: str, **labels: str) -> float:
    value = pipeline.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


async def test_a_batch_is_produced_stored_and_counted() -> None:
    """Accepted readings reach Kafka (keyed by patient) and the store; a reject goes to the dead
    letters only; the counters say so."""
    pipeline, producer, store = make()
    batch = [reading("thermo-1", 1), reading("thermo-2", 1), reading("unknown-9", 1)]
    admission = await pipeline.process(batch, asyncio.Event())
    assert admission is not None
    assert [t.patient_id for t in producer.telemetry] == ["P-0001", "P-0002"]
    assert [d.reason for d in producer.dead] == ["unknown_device"]
    assert len(store.rows) == 2
    assert sample(pipeline, "vigil_ingest_received_total") == 3
    assert sample(pipeline, "vigil_ingest_accepted_total") == 2
    assert sample(pipeline, "vigil_ingest_rejected_total", reason="unknown_device") == 1
    assert pipeline.durable_ok


async def test_an_unknown_device_reloads_the_registry_before_it_is_rejected() -> None:
    """A device bound since the last load is known when its first message is decided."""
    store = FakeStore(BINDINGS[:1])
    pipeline, producer, _ = make(store=store)
    await pipeline.process([reading("thermo-1")], asyncio.Event())
    loads = store.loads
    store.bindings = BINDINGS
    await pipeline.process([reading("thermo-2")], asyncio.Event())
    assert store.loads == loads + 1
    assert [t.device_id for t in producer.telemetry] == ["thermo-1", "thermo-2"]


async def test_a_kafka_failure_resends_only_what_kafka_did_not_take() -> None:
    """Kafka refuses part of a batch: the retry sends only those records again, and the
    database, which already committed, is not written twice."""
    producer = FakeProducer()
    producer.fail = 1  # the first record of the first attempt
    pipeline, _, store = make(producer=producer)
    batch = [reading("thermo-1", 1), reading("thermo-1", 2), reading("thermo-2", 1)]
    admission = await pipeline.process(batch, asyncio.Event())
    assert admission is not None
    sent = [(t.device_id, t.message.seq) for t in producer.telemetry]
    assert sorted(sent) == [("thermo-1", 1), ("thermo-1", 2), ("thermo-2", 1)]
    assert len(sent) == 3  # nothing twice
    assert store.writes == 1
    assert sample(pipeline, "vigil_ingest_batch_failures_total", stage="kafka") == 1
    assert pipeline.durable_ok


async def test_a_database_failure_retries_the_store_and_not_kafka() -> None:
    store = FakeStore()
    store.fail = 2
    pipeline, producer, _ = make(store=store)
    admission = await pipeline.process([reading()], asyncio.Event())
    assert admission is not None
    assert len(producer.telemetry) == 1
    assert len(store.rows) == 1
    assert sample(pipeline, "vigil_ingest_batch_failures_total", stage="db") == 2


async def test_stopped_while_not_durable_returns_none() -> None:
    """A batch that never became durable is not reported as processed (nothing acknowledges
    it); readiness says so meanwhile."""
    store = FakeStore()
    store.fail = 10**6
    pipeline, _, _ = make(store=store)
    stop = asyncio.Event()
    work = asyncio.ensure_future(pipeline.process([reading()], stop))
    for _ in range(2):  # the second attempt comes after the first failure was recorded
        await asyncio.wait_for(store.failed.wait(), 5.0)
        store.failed.clear()
    assert pipeline.ready() == (False, "not subscribed to the broker")
    pipeline.subscribed = True
    assert pipeline.ready() == (False, "last batch could not be made durable; retrying")
    stop.set()
    assert await work is None


async def test_a_redelivery_after_a_restart_is_counted_as_a_database_duplicate() -> None:
    """A fresh pipeline (empty window) gets a message stored before: the store's unique key
    catches it. A heartbeat, never stored, does not count as one."""
    store = FakeStore()
    message = reading()
    first, _, _ = make(store=store)
    await first.process([message], asyncio.Event())
    again, _, _ = make(store=store)
    await again.process([message, heartbeat()], asyncio.Event())
    assert sample(again, "vigil_ingest_duplicates_total", kind="db") == 1


async def test_a_heartbeat_goes_to_every_partition() -> None:
    pipeline, producer, store = make()
    await pipeline.process([reading(), heartbeat()], asyncio.Event())
    [spread] = producer.everywhere
    assert [t.device_id for t in spread] == ["heartbeat-pipeline"]
    assert len(store.rows) == 1


async def test_liveness_is_flushed_and_kept_on_failure() -> None:
    store = FakeStore()
    pipeline, _, _ = make(store=store)
    await pipeline.process([reading("thermo-1", 1), reading("thermo-2", 1)], asyncio.Event())
    store.fail_seen = 1
    await pipeline.flush_liveness()
    assert store.seen == []
    assert sample(pipeline, "vigil_ingest_batch_failures_total", stage="liveness") == 1
    await pipeline.flush_liveness()
    assert sorted(s.device_id for s in store.seen) == ["thermo-1", "thermo-2"]


def _batch(*mids: int) -> list[InboundMessage]:
    return [(*reading(seq=mid), mid) for mid in mids]


async def test_acknowledgements_follow_arrival_order_not_completion_order() -> None:
    """The second batch is durable first; its PUBACKs still wait for the first batch's."""
    metrics = IngestMetrics()
    acker = FakeAcker()
    in_flight: InFlight = asyncio.Queue()
    first_done: asyncio.Future[Admission | None] = asyncio.get_running_loop().create_future()

    async def first() -> Admission | None:
        return await first_done

    async def second() -> Admission | None:
        return Admission()

    acknowledging = asyncio.ensure_future(acknowledge_in_order(in_flight, acker, metrics))
    in_flight.put_nowait((asyncio.ensure_future(first()), _batch(1, 2)))
    in_flight.put_nowait((asyncio.ensure_future(second()), _batch(3, 0)))
    await asyncio.sleep(0.01)
    assert acker.acked == []
    first_done.set_result(Admission())
    in_flight.put_nowait(None)
    await acknowledging
    assert acker.acked == [1, 2, 3]


async def test_a_batch_not_made_durable_ends_acknowledging_and_answering() -> None:
    """A batch that was not made durable is not acknowledged, and neither is any batch after it:
    the broker redelivers them all. No device is answered for any of them."""
    metrics = IngestMetrics()
    acker = FakeAcker()
    answers = AckPublisher(metrics)
    pipeline, _, _ = make(answers=answers, metrics=metrics)
    durable = await pipeline.process([reading("thermo-1", 1)], asyncio.Event())
    later = await pipeline.process([reading("thermo-1", 2)], asyncio.Event())
    in_flight: InFlight = asyncio.Queue()

    async def done(admission: Admission | None) -> Admission | None:
        return admission

    for admission, mids in ((durable, (1,)), (None, (2,)), (later, (3,))):
        in_flight.put_nowait((asyncio.ensure_future(done(admission)), _batch(*mids)))
    in_flight.put_nowait(None)
    await acknowledge_in_order(in_flight, acker, metrics, answers)
    assert acker.acked == [1]
    assert len(answers.pending) == 1  # the first batch's one reading


class FakeSink:
    def __init__(self, connected: bool = True) -> None:
        self.connected = connected
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes) -> bool:
        if self.connected:
            self.published.append((topic, payload))
        return self.connected

    def backlog(self) -> int:
        return 0


async def test_answers_are_published_per_device_and_kept_while_disconnected() -> None:
    metrics = IngestMetrics()
    answers = AckPublisher(metrics, clock=lambda: NOW)
    pipeline, _, _ = make(answers=answers, metrics=metrics)
    admission = await pipeline.process(
        [reading("thermo-1", 1), reading("thermo-1", 2), reading("thermo-2", 1)], asyncio.Event()
    )
    assert admission is not None
    answers.add(admission)
    assert answers.publish_pending(FakeSink(connected=False)) == 0
    sink = FakeSink()
    assert answers.publish_pending(sink) == 2
    assert sorted(topic for topic, _ in sink.published) == [
        "vigil/v1/ack/thermo-1",
        "vigil/v1/ack/thermo-2",
    ]
    assert sample(pipeline, "vigil_ingest_acks_answered_total", outcome="stored") == 3


@pytest.mark.parametrize("backlog", [10_001])
async def test_answers_wait_while_the_connection_is_backed_up(backlog: int) -> None:
    metrics = IngestMetrics()
    answers = AckPublisher(metrics, clock=lambda: NOW)
    pipeline, _, _ = make(answers=answers, metrics=metrics)
    admission = await pipeline.process([reading()], asyncio.Event())
    assert admission is not None
    answers.add(admission)
    sink = FakeSink()
    sink.backlog = lambda: backlog  # type: ignore[method-assign]
    assert answers.publish_pending(sink) == 0
    assert len(answers.pending) == 1


async def test_flags_and_device_lag_count_every_reading_of_a_batch() -> None:
    """Counted per batch, the metrics say what one increment and one observation per reading
    say: each flag once per flagged reading, each reading's lag (receive time - device time,
    none below 0) in its bucket and in the sum."""
    lags = [-600.0, -1.0, 0.0, 0.01, 0.3, 5.0, 60.0, 3600.0, 86400.0, 8 * 86400.0, 9 * 86400.0]
    batch = []
    for seq, lag in enumerate(lags, start=1):
        topic, payload = reading("thermo-1", seq)
        document = json.loads(payload)
        document["device_time"] = (NOW - timedelta(seconds=lag)).isoformat()
        batch.append((topic, json.dumps(document).encode()))
    pipeline, _, _ = make()
    assert await pipeline.process(batch, asyncio.Event()) is not None
    assert sample(pipeline, "vigil_ingest_flagged_total", flag="device_clock_ahead") == 1
    assert sample(pipeline, "vigil_ingest_flagged_total", flag="device_clock_behind") == 2
    reference = IngestMetrics()
    for lag in lags:
        reference.device_lag.observe(max(lag, 0.0))
    name = "vigil_ingest_device_lag_seconds"
    for bound in ["0.01", "0.5", "5.0", "60.0", "3600.0", "86400.0", "+Inf"]:
        expected = reference.registry.get_sample_value(f"{name}_bucket", {"le": bound})
        assert sample(pipeline, f"{name}_bucket", le=bound) == expected
    assert sample(pipeline, f"{name}_count") == len(lags)
    expected_sum = reference.registry.get_sample_value(f"{name}_sum")
    assert sample(pipeline, f"{name}_sum") == pytest.approx(expected_sum)
