"""The configuration use cases: pin the configuration in force on the state topic, watch the
configuration store for a new one, and swap it into the engines between two batches.

``ConfigWatch`` re-reads the configuration every ``config_reload_s`` seconds; a new
``config_version`` is swapped into every engine between two transactions (patient state kept,
timers armed from old thresholds re-armed when the new ones bring them forward; only the
patients the change touched are recompiled and re-armed), in a transaction of its own that
writes the new ``__config__/<config_version>`` record and the state of every patient whose
deadlines moved. A configuration that fails to load or to compile keeps the old one running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from services.rules.adapters.metrics import RulesMetrics
from services.rules.domain.config import RulesCompiler, RulesConfig
from services.rules.domain.config_pieces import (
    ConfigDelta,
    changed_patients,
    content_hash,
)
from services.rules.service_layer.batch import abort
from services.rules.service_layer.partitions import PartitionEngines
from services.rules.service_layer.ports import TransactionalOutbox
from vigil.runtime import log_fields

log = logging.getLogger("vigil.rules")

CONFIG_KEY = "__config__/{version}"


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
    outbox: TransactionalOutbox,
    state_topic: str,
    config: RulesConfig,
    digest: str | None = None,
) -> Awaitable[Any]:
    """Pin ``config`` on the state topic (inside the caller's transaction): ``config_record``."""
    return await outbox.send(
        state_topic,
        config_record(config, digest),
        key=CONFIG_KEY.format(version=config.config_version).encode(),
        partition=0,
    )


async def pin_config(
    outbox: TransactionalOutbox,
    state_topic: str,
    config: RulesConfig,
    digest: str | None = None,
) -> None:
    """The start-up transaction: the record of the configuration the service starts on."""
    await outbox.begin()
    try:
        await (await write_config(outbox, state_topic, config, digest))
    except BaseException:
        try:
            await outbox.abort()
        except Exception:
            log.exception("rules_abort_failed")
        raise
    await outbox.commit()


async def swap_config(
    state_topic: str,
    outbox: TransactionalOutbox,
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
    await outbox.begin()
    try:
        sends = [await write_config(outbox, state_topic, config, digest)]
        for partition, engine in partitions.engines.items():
            moved += len(engine.reconfigure(config, compiler, patients))
            sends += await outbox.send_state(
                state_topic, partition, partitions.state_records(partition)
            )
        await asyncio.gather(*sends)
        await outbox.commit()
    except BaseException:
        # As for a batch: the engines run the new config but Kafka does not hold it; a restart
        # loads the store's config again and re-aligns them.
        await abort(outbox, partitions)
        raise
    partitions.committed()
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
