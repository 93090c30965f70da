"""Rules composition root: Kafka telemetry in, the pure engine in the middle, alerts out.

Delivery semantics: consume-transform-produce in Kafka transactions. Each transaction holds the
alerts that a run of telemetry records decided, the new state of every patient those records
touched (compacted topic ``vigil.rules.state.v1``, keyed by patient, on the same partition
number as the patient's telemetry), each partition's watermark, and the consumer offsets
(``send_offsets_to_transaction``). Either all of it is committed or none is: after a crash the
service restores the state committed with the offsets and re-reads from those offsets, so no
alert is lost and none is published twice. Readers of the alerts topic use
``isolation_level=read_committed`` (``vigil.kafka.make_consumer`` does).

One ``RulesEngine`` per assigned telemetry partition: a rebalance hands a partition, with its
state and its watermark, to another instance as a unit. The watermark is therefore per
partition (the largest device time seen on it, minus the allowed lateness).

Configuration: the built-in defaults from settings, then care-team protocols, patient overrides
and the profiles of monitored patients from PostgreSQL (migration 0004), pinned into one
``RulesConfig`` at start-up and recorded there in pieces (``adapters/config_store.py``). The
state topic gets a record of constant size under ``__config__/<config_version>``: the label,
the content hash that names the stored config, and the config without its patient profiles
(whole, when it has none), so a replay can load exactly the configuration an alert names.
``ConfigWatch`` re-reads the configuration every ``config_reload_s`` seconds while the service
runs; a new ``config_version`` is swapped into every engine between two transactions (patient
state kept, timers armed from old thresholds re-armed when the new ones bring them forward;
only the patients the change touched are recompiled and re-armed), in a transaction of its own
that writes the new ``__config__/<config_version>`` record and the state of every patient whose
deadlines moved. A configuration that fails to load or to compile keeps the old one running.

Operations: ``RulesMetrics`` (``adapters/metrics.py``) is fed from the processing loop and
served with ``/healthz`` and ``/readyz`` by ``vigil.ops.OpsServer`` on
``VIGIL_RULES_OPS_HOST:VIGIL_RULES_OPS_PORT``. Every assigned partition's engine is restored
as soon as it is assigned (in the processing loop, before the next fetch), so ``/readyz``
means "every owned patient's state is in memory", not "the first record will wait for it".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    TopicPartition,
)
from pydantic import ValidationError

from schemas.events import DeadLetter
from services.rules.adapters.codec import decode_observation
from services.rules.adapters.config_store import RulesConfigSource
from services.rules.adapters.metrics import RulesMetrics, RulesReadiness
from services.rules.domain.config import RulesCompiler, RulesConfig, Thresholds
from services.rules.domain.config_pieces import (
    ConfigDelta,
    changed_patients,
    content_hash,
)
from services.rules.domain.engine import RulesEngine
from services.rules.domain.heartbeat import HEARTBEAT_CODE
from services.rules.settings import RulesSettings
from vigil.kafka import encode, make_consumer, make_producer
from vigil.ops import kafka_outage, serving_ops
from vigil.runtime import configure_logging, log_fields, run_until_signalled, utcnow

log = logging.getLogger("vigil.rules")

META_KEY = "__meta__/{partition}"
CONFIG_KEY = "__config__/{version}"


def _config_source(settings: RulesSettings, defaults: Thresholds) -> RulesConfigSource:
    return RulesConfigSource(
        defaults,
        allowed_lateness_s=settings.allowed_lateness_s,
        arrival_lateness_s=settings.arrival_lateness_s,
        outage_gap_s=settings.outage_gap_s,
        resume_grace_s=settings.resume_grace_s,
        unbound_days=settings.monitor_unbound_days,
        cycle_days=settings.monitor_cycle_days,
    )


async def build_config(
    settings: RulesSettings, source: RulesConfigSource | None = None
) -> RulesConfig:
    """The rules config the settings name; from PostgreSQL through ``source`` when given (a
    reload then builds nothing while the rows are unchanged)."""
    if settings.config_file is not None:
        return RulesConfig.model_validate_json(settings.config_file.read_text())
    defaults = settings.thresholds()
    if not settings.config_from_postgres:
        return RulesConfig(
            config_version="settings",
            defaults=defaults,
            allowed_lateness_s=settings.allowed_lateness_s,
            arrival_lateness_s=settings.arrival_lateness_s,
            outage_gap_s=settings.outage_gap_s,
            resume_grace_s=settings.resume_grace_s,
        )
    if source is None:
        source = _config_source(settings, defaults)
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        return await source.load(conn)
    finally:
        await conn.close()


async def load_partition_state(
    settings: RulesSettings, partition: int
) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The committed state of one partition: (watermark meta, patient states)."""
    reader = make_consumer(settings.kafka, group_id=None, client_id="rules-restore")
    await reader.start()
    try:
        tp = TopicPartition(settings.state_topic, partition)
        reader.assign([tp])
        await reader.seek_to_beginning(tp)
        end = (await reader.end_offsets([tp]))[tp]
        meta: dict[str, Any] | None = None
        patients: dict[str, dict[str, Any]] = {}
        meta_key = META_KEY.format(partition=partition)
        while await reader.position(tp) < end:
            # Short: a partition's committed end is a transaction marker, which advances the
            # position without returning a record, so the last getmany always waits it out.
            for records in (await reader.getmany(tp, timeout_ms=50)).values():
                for record in records:
                    key = (record.key or b"").decode()
                    if key.startswith("__config__/"):
                        continue
                    if record.value is None:
                        patients.pop(key, None)
                    elif key == meta_key:
                        meta = orjson.loads(record.value)
                    else:
                        patients[key] = orjson.loads(record.value)
        return meta, patients
    finally:
        await reader.stop()


class ConfigWatch:
    """Re-reads the rules configuration on an interval and holds a changed one until the
    processing loop swaps it in at a batch boundary (never in the middle of a transaction).

    A load that fails (PostgreSQL down, an override the rules cannot read) is logged and
    counted, and the configuration in force stays: paging must never stop because a threshold
    edit is broken."""

    def __init__(
        self,
        load: Callable[[], Awaitable[RulesConfig]],
        current: RulesConfig,
        interval_s: float,
        metrics: RulesMetrics | None = None,
        *,
        delta: Callable[[], tuple[str | None, ConfigDelta]] | None = None,
        compiler: RulesCompiler | None = None,
    ) -> None:
        """``delta``: what the last load changed, and the ``config_version`` it changed from
        (``RulesConfigSource.delta``); without it every change recompiles every patient.
        ``compiler``: the one compiling ``current``."""
        self._load = load
        self._delta = delta
        self._metrics = metrics
        self.current_version = current.config_version
        self.interval_s = interval_s
        self.pending: RulesConfig | None = None
        # The compiler of the newest config checked: it has compiled every patient, and the
        # swap hands it to the engines, so they compile nothing again.
        self.compiled: RulesCompiler | None = (
            compiler if compiler is not None and compiler.config is current else None
        )
        # The patients whose rules differ between the config in force and the pending one
        # (None: any may), so the swap re-arms only them.
        self.pending_patients: set[str] | None = set()
        self.taken_patients: set[str] | None = set()
        self.failures = 0
        self.swaps = 0

    async def check_once(self) -> RulesConfig | None:
        """Load the configuration once; the changed config (also left pending), or None."""
        try:
            config = await asyncio.wait_for(self._load(), timeout=max(30.0, self.interval_s))
            previous = self.compiled
            if config.config_version == self.current_version:
                self.pending = None
                self.pending_patients = set()
                return None
            if previous is not None and previous.config.config_version == config.config_version:
                return config  # already checked and pending
            patients: set[str] | None = None
            if self._delta is not None and previous is not None:
                since, delta = self._delta()
                if since == previous.config.config_version:
                    patients = changed_patients(config, delta)
            # Compile the changed patients' rules now, off the hot path: an override that
            # validates as JSON but not as thresholds must be refused here, not when its
            # patient next reports. In a worker thread, as the build is: the loop goes on
            # deciding alerts meanwhile (the compiler is new, and no engine sees it before the
            # swap). Every other patient keeps what the previous compiler compiled.
            compiler = RulesCompiler(config)
            if previous is not None and patients is not None:
                compiler.keep_from(previous, patients, since_teams(self._delta))
            await asyncio.to_thread(compiler.compile_patients, patients)
        except Exception as error:  # any failure keeps the running config
            self.failures += 1
            if self._metrics is not None:
                self._metrics.config_reload_failures.inc()
            log.error(
                "rules_config_reload_failed",
                extra=log_fields(
                    failures=self.failures,
                    error=repr(error),
                    config_version=self.current_version,
                ),
            )
            return None
        self.pending = config
        self.compiled = compiler
        if patients is None or self.pending_patients is None:
            self.pending_patients = None
        else:
            self.pending_patients |= patients
        return config

    def take(self) -> RulesConfig | None:
        """The changed configuration to swap in now, if any; marks it current.
        ``taken_patients`` then names the patients it changes (None: any)."""
        config, self.pending = self.pending, None
        self.taken_patients, self.pending_patients = self.pending_patients, set()
        if config is not None:
            self.current_version = config.config_version
            self.swaps += 1
            if self._metrics is not None:
                self._metrics.config_swaps.inc()
        return config

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
            except TimeoutError:
                await self.check_once()


def since_teams(delta: Callable[[], tuple[str | None, ConfigDelta]] | None) -> frozenset[str]:
    """The care teams whose protocol the last load changed."""
    return delta()[1].teams if delta is not None else frozenset()


class PartitionEngines(ConsumerRebalanceListener):  # type: ignore[misc]
    """One engine per assigned telemetry partition: restored from the state topic the first
    time a batch of that partition is processed, dropped when the partition is revoked.

    Restoring in the processing loop rather than in the rebalance callback matters: the
    consumer may hand out records of a newly assigned partition before an assignment callback
    has finished, and a record processed by an engine without its state would be wrong."""

    def __init__(
        self,
        settings: RulesSettings,
        config: RulesConfig,
        metrics: RulesMetrics | None = None,
        readiness: RulesReadiness | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        # Shared by every partition's engine: each patient is compiled once per config.
        self.compiler = RulesCompiler(config)
        self.engines: dict[int, RulesEngine] = {}
        self.metrics = metrics or RulesMetrics()
        self.readiness = readiness or RulesReadiness()

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            self.engines.pop(tp.partition, None)
            self.readiness.restored.discard(tp.partition)
            self.metrics.forget_partition(tp.partition)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info(
            "rules_partitions_assigned",
            extra=log_fields(partitions=[tp.partition for tp in assigned]),
        )

    async def prepare(self, partitions: list[int]) -> None:
        """Restore the engines of newly assigned partitions together (each restore reads the
        state topic with its own reader; one after another they dominated a start-up)."""
        missing = {p for p in partitions if p not in self.engines}
        if missing:
            await asyncio.gather(*(self.engine_for(p) for p in sorted(missing)))

    async def engine_for(self, partition: int) -> RulesEngine:
        engine = self.engines.get(partition)
        if engine is not None:
            return engine
        started = time.perf_counter()
        engine = RulesEngine(self.config, self.compiler)
        meta, patients = await load_partition_state(self.settings, partition)
        if meta is not None:
            engine.restore_meta(meta)
        engine.restore_patients(patients)
        engine.take_dirty()
        self.engines[partition] = engine
        self.metrics.restore_seconds.observe(time.perf_counter() - started)
        self.metrics.track_watermark(
            partition, lambda: engine.watermark, utcnow, lambda: engine.arrival_clock
        )
        self.readiness.restored.add(partition)
        log.info(
            "rules_partition_restored",
            extra=log_fields(partition=partition, patients=len(patients)),
        )
        return engine


async def send_state(
    producer: AIOKafkaProducer,
    topic: str,
    partition: int,
    records: list[tuple[str, bytes]],
) -> list[Any]:
    """Queue state records for one partition as whole record batches (inside the caller's
    transaction); the futures of their delivery.

    A transaction writes thousands of small state records; ``send`` costs a partitioner call,
    an accumulator append and a future per record, which dominated a batch. Filling a batch
    builder directly is the same records, same partition, same transaction, at a fraction of it.
    """
    futures = []
    batch = producer.create_batch()
    for key, value in records:
        encoded = key.encode()
        if batch.append(key=encoded, value=value, timestamp=None) is None:
            batch.close()
            futures.append(await producer.send_batch(batch, topic, partition=partition))
            batch = producer.create_batch()
            if batch.append(key=encoded, value=value, timestamp=None) is None:
                raise ValueError(f"state of {key} does not fit in one record batch")
    if batch.record_count():
        batch.close()
        futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures


def config_record(config: RulesConfig, digest: str | None = None) -> bytes:
    """The state topic's record of ``config``: its label, the content hash it is stored under
    in PostgreSQL (``digest``, when the caller has it), how many patient profiles it has, and
    the config without them (the whole config, when it has none). Its size does not grow with
    the number of patients; a replay loads the profiles by the content hash."""
    return orjson.dumps(
        {
            "config_version": config.config_version,
            "content_hash": digest if digest is not None else content_hash(config),
            "profiles": len(config.profiles),
            "config": config.model_dump(mode="json", exclude={"profiles"}),
        }
    )


async def write_config(
    settings: RulesSettings,
    producer: AIOKafkaProducer,
    config: RulesConfig,
    digest: str | None = None,
) -> Any:
    """Pin ``config`` on the state topic (inside the caller's transaction): ``config_record``."""
    return await producer.send(
        settings.state_topic,
        config_record(config, digest),
        key=CONFIG_KEY.format(version=config.config_version).encode(),
        partition=0,
    )


async def swap_config(
    settings: RulesSettings,
    producer: AIOKafkaProducer,
    partitions: PartitionEngines,
    config: RulesConfig,
    compiler: RulesCompiler | None = None,
    patients: set[str] | None = None,
    digest: str | None = None,
) -> None:
    """Put ``config`` in force in every engine, between two batches, in one transaction: the
    config record and the state of every patient whose armed deadlines moved. A restart after
    it finds the re-armed deadlines; a crash before it commits restarts on the store's config.
    ``compiler``: the one that checked ``config`` (``ConfigWatch.compiled``), if at hand;
    ``patients``: the only patients whose rules changed (None: any); ``digest``: the config's
    content hash, if known."""
    old = partitions.config.config_version
    if compiler is None or compiler.config is not config:
        compiler = RulesCompiler(config)
    partitions.config = config
    partitions.compiler = compiler
    moved = 0
    await producer.begin_transaction()
    try:
        sends = [await write_config(settings, producer, config, digest)]
        for partition, engine in partitions.engines.items():
            moved += len(engine.reconfigure(config, compiler, patients))
            sends += await send_state(
                producer,
                settings.state_topic,
                partition,
                [
                    *engine.encode_patients(engine.take_dirty()),
                    (META_KEY.format(partition=partition), orjson.dumps(engine.meta_snapshot())),
                ],
            )
        await asyncio.gather(*sends)
        await producer.commit_transaction()
    except BaseException:
        # As for a batch: the engines run the new config but Kafka does not hold it; a restart
        # loads the store's config again and re-aligns them.
        _aborting(partitions)
        try:
            await producer.abort_transaction()
        except Exception:
            log.exception("rules_abort_failed")
        raise
    partitions.readiness.last_transaction_committed = True
    partitions.metrics.set_config(config.config_version)
    log.info(
        "rules_config_swapped",
        extra=log_fields(
            old_config_version=old,
            config_version=config.config_version,
            engines=len(partitions.engines),
            patients_rearmed=moved,
        ),
    )


def _aborting(partitions: PartitionEngines) -> None:
    partitions.readiness.last_transaction_committed = False
    partitions.metrics.transaction_aborts.inc()


async def run(
    settings: RulesSettings,
    stop: asyncio.Event,
    *,
    listening: Callable[[int], None] | None = None,
) -> None:
    """Run the rules service until ``stop``; ``listening`` is told the ops server's port (tests
    that ask for an ephemeral one with ``ops_port=0`` learn it this way)."""
    metrics = RulesMetrics()
    readiness = RulesReadiness()
    # First, so /healthz answers (and /readyz says why not ready) while start-up waits on
    # PostgreSQL or Kafka.
    async with serving_ops(
        metrics.registry,
        readiness.check,
        host=settings.ops_host,
        port=settings.ops_port,
        listening=listening,
        # An idle consumer does not notice Kafka going away: probe it (docs/reliability.md).
        watches=[kafka_outage(settings.kafka.bootstrap_servers)],
    ):
        await _consume(settings, stop, metrics, readiness)


async def _consume(
    settings: RulesSettings,
    stop: asyncio.Event,
    metrics: RulesMetrics,
    readiness: RulesReadiness,
) -> None:
    config_source = _config_source(settings, settings.thresholds())
    config = await build_config(settings, config_source)
    metrics.set_config(config.config_version)
    transactional_id = settings.transactional_id or f"{settings.group_id}-0"
    # A transaction carries many small state records: fewer, larger produce requests.
    producer = make_producer(
        settings.kafka, "rules", max_batch_bytes=512 * 1024, transactional_id=transactional_id
    )
    # The producer starts first: initialising the transactional id fences a crashed
    # predecessor and aborts its open transaction, so the state topic's committed end moves on.
    await producer.start()
    readiness.producer_started = True
    partitions = PartitionEngines(settings, config, metrics, readiness)
    consumer = make_consumer(
        settings.kafka,
        group_id=settings.group_id,
        client_id="rules",
        max_poll_records=settings.max_batch,
    )
    consumer.subscribe([settings.telemetry_topic], listener=partitions)
    watch = ConfigWatch(
        lambda: build_config(settings, config_source),
        config,
        settings.config_reload_s,
        metrics=metrics,
        delta=lambda: (config_source.delta_from, config_source.delta),
        compiler=partitions.compiler,
    )
    watching: asyncio.Future[None] | None = None
    try:
        async with producer.transaction():
            await (await write_config(settings, producer, config, _digest(config_source, config)))
        readiness.last_transaction_committed = True
        await consumer.start()
        log.info(
            "rules_started",
            extra=log_fields(
                config_version=config.config_version, transactional_id=transactional_id
            ),
        )
        stop_wait = asyncio.ensure_future(stop.wait())
        if settings.config_reload_s > 0:
            watching = asyncio.ensure_future(watch.watch(stop))
        lag_updated = 0.0
        while not stop.is_set():
            changed = watch.take()
            if changed is not None:
                await swap_config(
                    settings,
                    producer,
                    partitions,
                    changed,
                    watch.compiled,
                    watch.taken_patients,
                    _digest(config_source, changed),
                )
            owned = consumer.assignment()
            readiness.assigned = frozenset(tp.partition for tp in owned)
            await partitions.prepare(sorted(readiness.assigned))
            if time.monotonic() - lag_updated >= 1.0:
                # At most once a second: a position query per partition is not free.
                lag_updated = time.monotonic()
                await _update_lag(consumer, owned, metrics)
            fetch = asyncio.ensure_future(
                consumer.getmany(timeout_ms=500, max_records=settings.max_batch)
            )
            done, _ = await asyncio.wait({fetch, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if fetch not in done:
                fetch.cancel()
                break
            batch = fetch.result()
            if batch:
                batch = await fill_batch(consumer, batch, settings.max_batch)
                await process_batch(settings, producer, partitions, batch, consumer.assignment)
        stop_wait.cancel()
    finally:
        if watching is not None:
            watching.cancel()
        readiness.producer_started = False
        await consumer.stop()
        await producer.stop()


def _digest(source: RulesConfigSource, config: RulesConfig) -> str | None:
    """The content hash of ``config`` when ``source`` loaded it (None: compute it)."""
    manifest = source.manifest
    if manifest is not None and manifest.label == config.config_version:
        return manifest.content_hash
    return None


async def _update_lag(
    consumer: AIOKafkaConsumer, owned: set[TopicPartition], metrics: RulesMetrics
) -> None:
    """Consumer lag per owned partition: the last stable offset minus our position."""
    for tp in owned:
        end = consumer.last_stable_offset(tp)
        if end is None:
            continue  # nothing fetched from it yet: the broker's end is not known here
        try:
            position = await asyncio.wait_for(consumer.position(tp), 1.0)
        except Exception:  # revoked meanwhile, or its position is being reset: skip this round
            continue
        metrics.consumer_lag.labels(str(tp.partition)).set(max(0, end - position))


async def fill_batch(
    consumer: AIOKafkaConsumer,
    batch: dict[TopicPartition, list[Any]],
    max_records: int,
) -> dict[TopicPartition, list[Any]]:
    """Grow a fetched batch while the consumer is behind (records already on the broker past
    its position), up to ``max_records``: one transaction then writes each touched patient's
    state once for many more events. A consumer that has caught up returns at once, so a live
    stream's alerts are never held back to fill a batch."""
    total = sum(len(records) for records in batch.values())
    while total < max_records and _behind(consumer, batch):
        more = await consumer.getmany(timeout_ms=100, max_records=max_records - total)
        if not more:
            break
        for tp, records in more.items():
            held = batch.get(tp)
            if held and records and records[0].offset <= held[-1].offset:
                # The partition was re-positioned (revoked and assigned again): what we held of
                # it comes again, so only the re-read records stand.
                total -= len(held)
                held = None
            batch[tp] = records if not held else held + records
            total += len(records)
    return batch


def _behind(consumer: AIOKafkaConsumer, batch: dict[TopicPartition, list[Any]]) -> bool:
    for tp, records in batch.items():
        if not records:
            continue
        end = consumer.last_stable_offset(tp)
        if end is not None and records[-1].offset + 1 < end:
            return True
    return False


async def process_batch(
    settings: RulesSettings,
    producer: AIOKafkaProducer,
    partitions: PartitionEngines,
    batch: dict[TopicPartition, list[Any]],
    assignment: Callable[[], set[TopicPartition]],
) -> int:
    """One transaction: alerts, state of the touched patients, watermarks, offsets."""
    started = time.perf_counter()
    sends = []
    offsets: dict[TopicPartition, int] = {}
    alerts_sent = 0
    emitted: Counter[tuple[str, str]] = Counter()
    gaps: list[tuple[str, str, int]] = []
    outages: list[tuple[int, datetime, datetime]] = []
    dead = 0
    owned = assignment()
    await partitions.prepare(
        [tp.partition for tp, records in batch.items() if records and tp in owned]
    )
    await producer.begin_transaction()
    try:
        for tp, records in batch.items():
            if not records:
                continue
            if tp not in assignment():
                continue  # revoked meanwhile: its new owner reads these records again
            engine = await partitions.engine_for(tp.partition)
            for record in records:
                payload = record.value or b""
                try:
                    obs = decode_observation(payload)
                except ValidationError as error:
                    # Ingest validated it, so this is a contract break between services: keep
                    # it with its reason rather than skip it.
                    letter = DeadLetter.for_payload(
                        reason="telemetry_contract",
                        detail=str(error.errors()[:1]),
                        service="rules",
                        source_topic=settings.telemetry_topic,
                        received_at=utcnow(),
                        payload=payload,
                    )
                    sends.append(await producer.send(settings.deadletter_topic, encode(letter)))
                    dead += 1
                    continue
                for alert in engine.on_observation(obs):
                    alerts_sent += 1
                    emitted[(alert.priority.value, alert.rule_id)] += 1
                    # A heartbeat reaches every partition: logged at debug, not once per
                    # partition at info.
                    log.log(
                        logging.DEBUG if alert.code == HEARTBEAT_CODE else logging.INFO,
                        "alert_decided",
                        extra=log_fields(
                            alert_id=str(alert.alert_id),
                            code=alert.code,
                            phase=alert.phase.value,
                            patient_id=alert.patient_id,
                        ),
                    )
                    sends.append(
                        await producer.send(
                            settings.alerts_topic, encode(alert), key=alert.patient_id.encode()
                        )
                    )
            gaps += engine.take_seq_gaps()
            for began, ended in engine.take_outages():
                outages.append((tp.partition, began, ended))
            sends += await send_state(
                producer,
                settings.state_topic,
                tp.partition,
                [
                    *engine.encode_patients(engine.take_dirty()),
                    (
                        META_KEY.format(partition=tp.partition),
                        orjson.dumps(engine.meta_snapshot()),
                    ),
                ],
            )
            offsets[tp] = records[-1].offset + 1
        decided = time.perf_counter()
        await asyncio.gather(*sends)
        if offsets:
            await producer.send_offsets_to_transaction(offsets, settings.group_id)
        await producer.commit_transaction()
    except BaseException:
        # The engines are now ahead of what Kafka holds; only a restart (state restored from
        # the last committed transaction) makes them agree again, so the service stops here.
        _aborting(partitions)
        try:
            await producer.abort_transaction()
        except Exception:  # a fenced or broken producer cannot abort; Kafka aborts on timeout
            log.exception("rules_abort_failed")
        raise
    committed = time.perf_counter()
    m = partitions.metrics
    partitions.readiness.last_transaction_committed = True
    consumed = sum(len(batch[tp]) for tp in offsets)
    m.events.inc(consumed)
    m.batch_size.observe(consumed)
    m.commit_seconds.observe(committed - decided)
    m.batch_seconds.observe(committed - started)
    for (priority, rule_id), count in emitted.items():
        m.alerts.labels(priority, rule_id).inc(count)
    if dead:
        m.dead_letters.labels("telemetry_contract").inc(dead)
    for partition, began, ended in outages:
        m.outages.labels(str(partition)).inc()
        # Recorded once per partition: the timers that fell due inside it waited for the
        # data queued meanwhile (docs/rules.md, "After an outage").
        log.warning(
            "rules_pipeline_outage",
            extra=log_fields(
                partition=partition,
                last_arrival_before=began.isoformat(),
                first_arrival_after=ended.isoformat(),
                seconds=round((ended - began).total_seconds(), 1),
            ),
        )
    if gaps:
        m.seq_gaps.inc(len(gaps))
        m.seq_missing.inc(sum(missing for _, _, missing in gaps))
    log.debug(
        "rules_batch_committed",
        extra=log_fields(
            records=sum(len(r) for r in batch.values()),
            alerts=alerts_sent,
            ms=round((time.perf_counter() - started) * 1000, 1),
            # The part spent deciding (decode, rules, state encoding); the rest is Kafka's.
            decide_ms=round((decided - started) * 1000, 1),
        ),
    )
    return alerts_sent


def main(argv: list[str] | None = None) -> int:
    settings = RulesSettings()
    configure_logging(settings.log_level)
    return run_until_signalled(lambda stop: run(settings, stop))
