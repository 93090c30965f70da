"""The rules' service layer against in-memory fakes: a fake Kafka whose telemetry partitions a
fake consumer reads, whose state topic a fake state store restores from, and into which a fake
transactional producer publishes only what a committed transaction holds (and can be told to
refuse a commit). What these tests pin is the delivery contract of docs/rules.md, "Delivery
semantics": a batch's alerts, touched patients' state, watermarks and consumer offsets in one
transaction; nothing of a failed one visible, and a restart deciding the batch again from the
committed state; a new configuration swapped in between two batches, never inside one; a record
that breaks the telemetry contract kept as a dead letter while the batch goes on."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition

from schemas.events import Alert, AlertPhase, DeadLetter, Telemetry
from services.rules.adapters.metrics import RulesMetrics, RulesReadiness
from services.rules.domain.config import RulesConfig, Thresholds
from services.rules.domain.config_pieces import ConfigDelta
from services.rules.domain.engine import RulesEngine
from services.rules.entrypoints.consumer import RulesRuntime, serve
from services.rules.service_layer.batch import process_batch
from services.rules.service_layer.config_swap import ConfigWatch
from services.rules.service_layer.partitions import PartitionEngines
from services.rules.service_layer.ports import Topics
from tests.support.rules import Home, run_stream

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
TOPICS = Topics(
    telemetry="t.telemetry",
    alerts="t.alerts",
    state="t.state",
    deadletter="t.deadletter",
    group_id="t-rules",
)
OLD = RulesConfig(config_version="v-old", allowed_lateness_s=0)


def tp(partition: int) -> TopicPartition:
    return TopicPartition(TOPICS.telemetry, partition)


@dataclass(frozen=True)
class Record:
    offset: int
    value: bytes | None


@dataclass(frozen=True)
class Sent:
    topic: str
    key: bytes | None
    value: bytes
    partition: int | None


@dataclass
class Transaction:
    sends: list[Sent] = field(default_factory=list)
    offsets: dict[Any, int] = field(default_factory=dict)
    group_id: str | None = None
    outcome: str = "open"

    def on(self, topic: str) -> list[Sent]:
        return [s for s in self.sends if s.topic == topic]

    def alerts(self) -> list[Alert]:
        return [Alert.model_validate_json(s.value) for s in self.on(TOPICS.alerts)]

    def state_keys(self, partition: int) -> set[str]:
        return {
            (s.key or b"").decode()
            for s in self.on(TOPICS.state)
            if s.partition == partition and not (s.key or b"").startswith(b"__config__/")
        }


class FakeKafka:
    """Topics as lists, and what committed transactions made of them: the published records,
    the state topic (compacted: the last value per key, per partition) and the group's
    offsets."""

    def __init__(self, partitions: int = 2) -> None:
        self.telemetry: dict[int, list[Record]] = {p: [] for p in range(partitions)}
        self.published: list[Sent] = []
        self.state: dict[int, dict[str, bytes]] = {p: {} for p in range(partitions)}
        self.offsets: dict[Any, int] = {}
        self.transactions: list[Transaction] = []
        self.appended = asyncio.Event()

    def append(self, partition: int, *events: Telemetry | bytes) -> None:
        log = self.telemetry[partition]
        for event in events:
            value = event if isinstance(event, bytes) else event.model_dump_json(by_alias=True)
            log.append(Record(len(log), value if isinstance(value, bytes) else value.encode()))
        self.appended.set()

    def apply(self, transaction: Transaction) -> None:
        for sent in transaction.sends:
            self.published.append(sent)
            if sent.topic == TOPICS.state:
                assert sent.partition is not None and sent.key is not None
                self.state[sent.partition][sent.key.decode()] = sent.value
        self.offsets.update(transaction.offsets)

    def committed(self) -> list[Transaction]:
        return [t for t in self.transactions if t.outcome == "committed"]

    def published_alerts(self) -> list[Alert]:
        return [
            Alert.model_validate_json(s.value) for s in self.published if s.topic == TOPICS.alerts
        ]


def delivered() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


class FakeOutbox:
    """A transactional producer: records what each transaction holds; publishes it to the fake
    Kafka only on commit. ``refuse_commits`` commits fail (as a fenced producer's or a broker's
    refusal would); ``on_send`` and ``on_commit`` let a test act at those points."""

    def __init__(self, kafka: FakeKafka, *, refuse_commits: int = 0) -> None:
        self.kafka = kafka
        self.refuse_commits = refuse_commits
        self.open: Transaction | None = None
        self.on_send: Callable[[Sent], Awaitable[None]] | None = None
        self.on_commit: Callable[[Transaction], Awaitable[None]] | None = None
        self.stopped = False

    async def begin(self) -> None:
        assert self.open is None, "a transaction is already open"
        self.open = Transaction()
        self.kafka.transactions.append(self.open)

    def _add(self, sent: Sent) -> None:
        assert self.open is not None, "send outside a transaction"
        self.open.sends.append(sent)

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None = None, partition: int | None = None
    ) -> Awaitable[Any]:
        sent = Sent(topic, key, value, partition)
        self._add(sent)
        if self.on_send is not None:
            await self.on_send(sent)
        return delivered()

    async def send_state(
        self, topic: str, partition: int, records: list[tuple[str, bytes]]
    ) -> list[Awaitable[Any]]:
        for key, value in records:
            self._add(Sent(topic, key.encode(), value, partition))
        return [delivered()]

    async def send_offsets(self, offsets: dict[Any, int], group_id: str) -> None:
        assert self.open is not None
        self.open.offsets.update(offsets)
        self.open.group_id = group_id

    async def commit(self) -> None:
        transaction = self.open
        assert transaction is not None
        if self.on_commit is not None:
            await self.on_commit(transaction)
        if self.refuse_commits:
            self.refuse_commits -= 1
            raise RuntimeError("commit refused")
        self.open = None
        transaction.outcome = "committed"
        self.kafka.apply(transaction)

    async def abort(self) -> None:
        assert self.open is not None
        self.open.outcome = "aborted"
        self.open = None

    async def stop(self) -> None:
        self.stopped = True


class FakeStateStore:
    """Restores a partition from the fake Kafka's committed state topic."""

    def __init__(self, kafka: FakeKafka) -> None:
        self.kafka = kafka
        self.loads: list[int] = []

    async def load(self, partition: int) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
        self.loads.append(partition)
        meta: dict[str, Any] | None = None
        patients: dict[str, dict[str, Any]] = {}
        for key, value in self.kafka.state[partition].items():
            if key == f"__meta__/{partition}":
                meta = orjson.loads(value)
            elif not key.startswith("__config__/"):
                patients[key] = orjson.loads(value)
        return meta, patients


class FakeConsumer:
    """Owns every telemetry partition of the fake Kafka and reads them from the group's
    committed offsets on."""

    def __init__(self, kafka: FakeKafka) -> None:
        self.kafka = kafka
        self.positions = {tp(p): kafka.offsets.get(tp(p), 0) for p in kafka.telemetry}
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    def assignment(self) -> set[Any]:
        return set(self.positions)

    def _take(self, max_records: int | None) -> dict[Any, list[Any]]:
        batch: dict[Any, list[Any]] = {}
        room = max_records if max_records is not None else 1 << 30
        for part, position in self.positions.items():
            records = self.kafka.telemetry[part.partition][position : position + room]
            if records:
                batch[part] = records
                self.positions[part] = position + len(records)
                room -= len(records)
        return batch

    async def getmany(
        self, *, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[Any, list[Any]]:
        batch = self._take(max_records)
        if not batch:
            self.kafka.appended.clear()
            try:
                await asyncio.wait_for(self.kafka.appended.wait(), timeout_ms / 1000)
            except TimeoutError:
                return {}
            batch = self._take(max_records)
        return batch

    def last_stable_offset(self, part: Any) -> int | None:
        return len(self.kafka.telemetry[part.partition])

    async def position(self, part: Any) -> int:
        return self.positions[part]


def engines(kafka: FakeKafka, config: RulesConfig = OLD) -> PartitionEngines:
    return PartitionEngines(FakeStateStore(kafka), config, RulesMetrics(), RulesReadiness())


async def consume_all(
    kafka: FakeKafka, partitions: PartitionEngines, outbox: FakeOutbox
) -> FakeConsumer:
    """One batch of everything on the telemetry topic past the committed offsets."""
    consumer = FakeConsumer(kafka)
    batch = await consumer.getmany(timeout_ms=0)
    await process_batch(TOPICS, outbox, partitions, batch, consumer.assignment)
    return consumer


async def test_a_batch_commits_its_alerts_state_watermarks_and_offsets_in_one_transaction() -> None:
    kafka = FakeKafka()
    a, b = Home("P-a", T0), Home("P-b", T0)
    kafka.append(0, a.temp(0, 38.6), a.status(0), a.temp(5, 38.7))
    kafka.append(1, b.temp(0, 36.8), b.status(0))
    partitions = engines(kafka)
    outbox = FakeOutbox(kafka)

    await consume_all(kafka, partitions, outbox)

    [transaction] = kafka.transactions
    assert transaction.outcome == "committed"
    expected = run_stream(RulesEngine(OLD), [a.temp(0, 38.6)])
    assert [al.code for al in expected] == ["fever_single"]
    assert [(al.alert_id, al.code) for al in transaction.alerts()] == [
        (al.alert_id, al.code) for al in expected
    ]
    assert all(s.key == b"P-a" for s in transaction.on(TOPICS.alerts))
    # Each touched patient's state on its telemetry partition's number, with that partition's
    # watermark; the consumer offsets past the last record of each partition, for the group.
    assert transaction.state_keys(0) == {"P-a", "__meta__/0"}
    assert transaction.state_keys(1) == {"P-b", "__meta__/1"}
    assert transaction.offsets == {tp(0): 3, tp(1): 2}
    assert transaction.group_id == TOPICS.group_id
    assert kafka.published == transaction.sends
    assert partitions.readiness.last_transaction_committed
    assert partitions.metrics.events._value.get() == 5


async def test_a_batch_whose_commit_fails_publishes_nothing_and_a_restart_decides_it_again() -> (
    None
):
    """The second batch's commit is refused: none of its alerts, state or offsets reach Kafka,
    the error stops the loop. A restarted service restores the state committed with the first
    batch, reads the second again from the committed offsets, and publishes exactly what an
    uninterrupted run publishes: the fever's end (decided from the restored open episode)
    once, and nothing of the first batch twice."""

    def first(a: Home, b: Home) -> list[tuple[int, Telemetry]]:
        return [(0, a.temp(0, 38.6)), (0, a.status(0)), (0, a.temp(5, 38.7)), (1, b.status(0))]

    def second(a: Home, b: Home) -> list[tuple[int, Telemetry]]:
        return [(0, a.temp(20, 36.9)), (0, a.status(20)), (1, b.status(20))]

    def feed(kafka: FakeKafka, events: list[tuple[int, Telemetry]]) -> None:
        for partition, event in events:
            kafka.append(partition, event)

    # Uninterrupted.
    clean = FakeKafka()
    a, b = Home("P-a", T0), Home("P-b", T0)
    clean_partitions, clean_outbox = engines(clean), FakeOutbox(clean)
    feed(clean, first(a, b))
    await consume_all(clean, clean_partitions, clean_outbox)
    feed(clean, second(a, b))
    await consume_all(clean, clean_partitions, clean_outbox)

    # The same stream, the second commit refused.
    kafka = FakeKafka()
    a, b = Home("P-a", T0), Home("P-b", T0)
    partitions = engines(kafka)
    feed(kafka, first(a, b))
    await consume_all(kafka, partitions, FakeOutbox(kafka))
    after_first = (
        list(kafka.published),
        dict(kafka.offsets),
        {p: dict(s) for p, s in kafka.state.items()},
    )
    feed(kafka, second(a, b))
    refusing = FakeOutbox(kafka, refuse_commits=1)
    with pytest.raises(RuntimeError, match="commit refused"):
        await consume_all(kafka, partitions, refusing)
    assert kafka.transactions[-1].outcome == "aborted"
    assert kafka.transactions[-1].alerts(), "the refused transaction held alerts"
    assert (kafka.published, kafka.offsets, kafka.state) == after_first
    assert not partitions.readiness.last_transaction_committed
    assert partitions.metrics.transaction_aborts._value.get() == 1

    # Restart: new engines restored from the committed state, reading from committed offsets.
    store = FakeStateStore(kafka)
    restarted = PartitionEngines(store, OLD, RulesMetrics(), RulesReadiness())
    consumer = await consume_all(kafka, restarted, FakeOutbox(kafka))
    assert sorted(store.loads) == [0, 1]
    assert consumer.positions == {tp(0): 5, tp(1): 2}
    retried = kafka.committed()[-1].alerts()
    assert (AlertPhase.END, "fever_cleared") in {(al.phase, al.code) for al in retried}

    def seen(alerts: list[Alert]) -> list[tuple[Any, str, AlertPhase]]:
        return [(al.alert_id, al.code, al.phase) for al in alerts]

    assert seen(kafka.published_alerts()) == seen(clean.published_alerts())
    assert kafka.state == clean.state
    assert kafka.offsets == clean.offsets


class FakeConfigStore:
    def __init__(self, config: RulesConfig) -> None:
        self.config = config
        self.loads = 0

    async def load(self) -> RulesConfig:
        self.loads += 1
        return self.config

    def delta(self) -> tuple[str | None, ConfigDelta]:
        return None, ConfigDelta()

    def digest(self, config: RulesConfig) -> str | None:
        return None


async def test_a_new_configuration_is_swapped_in_between_two_batches_never_inside_one() -> None:
    """The configuration changes (38.0 °C pages) while the first batch is being decided: the
    rest of that batch is still decided on the old one (38.1 °C stays quiet), then a
    transaction of its own pins the new one and the second batch pages on 38.1 °C."""
    kafka = FakeKafka(partitions=1)
    a, b = Home("P-a", T0), Home("P-b", T0)
    kafka.append(0, a.temp(0, 38.6), b.temp(0, 38.1), a.status(0), b.status(0))
    new = RulesConfig(
        config_version="v-new",
        allowed_lateness_s=0,
        defaults=Thresholds(fever_single_c=38.0, fever_sustained_c=37.9),
    )
    store = FakeConfigStore(OLD)
    metrics, readiness = RulesMetrics(), RulesReadiness()
    partitions = PartitionEngines(FakeStateStore(kafka), OLD, metrics, readiness)
    watch = ConfigWatch(store.load, OLD, 0, metrics=metrics, compiler=partitions.compiler)
    outbox = FakeOutbox(kafka)
    consumer = FakeConsumer(kafka)
    stop = asyncio.Event()

    async def edited_while_deciding(sent: Sent) -> None:
        if sent.topic == TOPICS.alerts and store.config is OLD:
            store.config = new
            assert await watch.check_once() is new

    async def on_commit(transaction: Transaction) -> None:
        if transaction.offsets.get(tp(0)) == 4:
            kafka.append(0, b.temp(5, 38.1))
        elif transaction.offsets.get(tp(0)) == 5:
            stop.set()

    outbox.on_send = edited_while_deciding
    outbox.on_commit = on_commit
    runtime = RulesRuntime(
        topics=TOPICS,
        consumer=consumer,
        outbox=outbox,
        partitions=partitions,
        watch=watch,
        config_store=store,
        metrics=metrics,
        readiness=readiness,
        max_batch=1000,
        config_reload_s=0,
        transactional_id="t-rules-0",
    )
    await asyncio.wait_for(serve(runtime, stop), 10)

    pinned, first, swap, second = kafka.transactions
    assert all(t.outcome == "committed" for t in kafka.transactions)
    assert [s.key for s in pinned.sends] == [b"__config__/v-old"]
    assert [(al.patient_id, al.code, al.config_version) for al in first.alerts()] == [
        ("P-a", "fever_single", "v-old")
    ]
    assert first.offsets == {tp(0): 4}
    assert swap.sends[0].key == b"__config__/v-new" and swap.sends[0].partition == 0
    assert swap.offsets == {} and swap.alerts() == []
    assert [(al.patient_id, al.code, al.config_version) for al in second.alerts()] == [
        ("P-b", "fever_single", "v-new")
    ]
    assert watch.swaps == 1 and partitions.config is new
    assert consumer.started and consumer.stopped and outbox.stopped
    assert not readiness.producer_started


async def test_a_record_that_breaks_the_contract_is_a_dead_letter_and_the_batch_goes_on() -> None:
    kafka = FakeKafka(partitions=1)
    a, b = Home("P-a", T0), Home("P-b", T0)
    poison = b'{"patient_id": "P-x", "message": {"schema": "nonsense"}}'
    kafka.append(0, a.status(0), poison, b.temp(0, 38.6), b.status(0))
    partitions = engines(kafka)

    await consume_all(kafka, partitions, FakeOutbox(kafka))

    [transaction] = kafka.transactions
    assert transaction.outcome == "committed"
    [letter] = [DeadLetter.model_validate_json(s.value) for s in transaction.on(TOPICS.deadletter)]
    assert (letter.reason, letter.service, letter.source_topic) == (
        "telemetry_contract",
        "rules",
        TOPICS.telemetry,
    )
    assert base64.b64decode(letter.payload_b64) == poison
    assert letter.detail
    # The records after it are decided and committed with it, its offset included.
    assert [(al.patient_id, al.code) for al in transaction.alerts()] == [("P-b", "fever_single")]
    assert transaction.state_keys(0) == {"P-a", "P-b", "__meta__/0"}
    assert transaction.offsets == {tp(0): 4}
    assert partitions.metrics.dead_letters.labels("telemetry_contract")._value.get() == 1
    assert partitions.metrics.events._value.get() == 4
