"""One engine per assigned telemetry partition, restored from the state store.

A rebalance hands a partition, with its state and its watermark, to another instance as a
unit; the watermark is therefore per partition (the largest device time seen on it, minus the
allowed lateness).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from services.rules.adapters.metrics import RulesMetrics, RulesReadiness
from services.rules.domain.config import RulesCompiler, RulesConfig
from services.rules.domain.engine import RulesEngine
from services.rules.service_layer.ports import StateStore
from vigil.runtime import log_fields, utcnow

log = logging.getLogger("vigil.rules")

META_KEY = "__meta__/{partition}"


class PartitionEngines:
    """One engine per assigned telemetry partition: restored from the state store the first
    time a batch of that partition is processed, dropped when the partition is revoked.

    Restoring in the processing loop rather than in the rebalance callback matters: the
    consumer may hand out records of a newly assigned partition before an assignment callback
    has finished, and a record processed by an engine without its state would be wrong."""

    def __init__(
        self,
        store: StateStore,
        config: RulesConfig,
        metrics: RulesMetrics | None = None,
        readiness: RulesReadiness | None = None,
    ) -> None:
        self.store = store
        self.config = config
        # Shared by every partition's engine: each patient is compiled once per config.
        self.compiler = RulesCompiler(config)
        self.engines: dict[int, RulesEngine] = {}
        self.metrics = metrics or RulesMetrics()
        self.readiness = readiness or RulesReadiness()

    def revoke(self, revoked: list[Any]) -> None:
        """Forget the engines of revoked partitions (their new owner restores them)."""
        for tp in revoked:
            self.engines.pop(tp.partition, None)
            self.readiness.restored.discard(tp.partition)
            self.metrics.forget_partition(tp.partition)

    async def prepare(self, partitions: list[int]) -> None:
        """Restore the engines of newly assigned partitions together (each restore reads the
        state store on its own; one after another they dominated a start-up)."""
        missing = {p for p in partitions if p not in self.engines}
        if missing:
            await asyncio.gather(*(self.engine_for(p) for p in sorted(missing)))

    async def engine_for(self, partition: int) -> RulesEngine:
        engine = self.engines.get(partition)
        if engine is not None:
            return engine
        started = time.perf_counter()
        engine = RulesEngine(self.config, self.compiler)
        meta, patients = await self.store.load(partition)
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

    def state_records(self, partition: int) -> list[tuple[str, bytes]]:
        """The records a transaction writes for ``partition``: the state of every patient
        changed since the last call, then the partition's watermark meta."""
        engine = self.engines[partition]
        return [
            *engine.encode_patients(engine.take_dirty()),
            (META_KEY.format(partition=partition), orjson.dumps(engine.meta_snapshot())),
        ]

    def aborting(self) -> None:
        """A transaction is being aborted: the engines are ahead of what Kafka holds."""
        self.readiness.last_transaction_committed = False
        self.metrics.transaction_aborts.inc()

    def committed(self) -> None:
        self.readiness.last_transaction_committed = True
