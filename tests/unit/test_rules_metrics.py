"""The rules service's metric objects and readiness (``services/rules/adapters/metrics.py``),
and the counting ``ConfigWatch`` does into them."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import generate_latest

from services.rules.adapters.metrics import RulesMetrics, RulesReadiness
from services.rules.domain.config import RulesConfig
from services.rules.service_layer.config_swap import ConfigWatch
from services.rules.settings import RulesSettings
from tests.ops_scrape import parse, value

T0 = datetime(2026, 3, 1, 3, 0, tzinfo=UTC)


def samples(metrics: RulesMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return parse(generate_latest(metrics.registry).decode())


def test_readiness_needs_producer_commit_assignment_and_every_engine_restored() -> None:
    """Not ready until the producer started, the last transaction committed, partitions are
    assigned and each has its engine restored; an abort makes it unready again."""
    ready = RulesReadiness()
    assert ready.check() == (False, "producer not started")
    ready.producer_started = True
    assert ready.check() == (False, "last transaction not committed")
    ready.last_transaction_committed = True
    assert ready.check() == (False, "no telemetry partition assigned")
    ready.assigned = frozenset({0, 1})
    ready.restored.add(0)
    assert ready.check() == (False, "state of partitions [1] not restored")
    ready.restored.add(1)
    assert ready.check()[0] is True
    ready.last_transaction_committed = False
    assert ready.check()[0] is False


def test_watermark_lag_is_computed_at_scrape_time_and_nan_before_any_event() -> None:
    """The gauge reads the engine's watermark and the clock when scraped, so an idle
    partition's lag grows between batches; before the first event it is NaN, not 0."""
    metrics = RulesMetrics()
    clock = {"now": T0}
    mark: dict[str, datetime | None] = {"at": None}
    metrics.track_watermark(3, lambda: mark["at"], lambda: clock["now"])
    assert math.isnan(value(samples(metrics), "vigil_rules_watermark_lag_seconds", partition="3"))
    mark["at"] = T0 - timedelta(seconds=90)
    assert value(samples(metrics), "vigil_rules_watermark_lag_seconds", partition="3") == 90.0
    clock["now"] = T0 + timedelta(seconds=30)
    assert value(samples(metrics), "vigil_rules_watermark_lag_seconds", partition="3") == 120.0


def test_forgetting_a_partition_drops_its_series() -> None:
    """A revoked partition's lag series disappear rather than freeze at their last value."""
    metrics = RulesMetrics()
    metrics.consumer_lag.labels("2").set(5)
    metrics.track_watermark(2, lambda: T0, lambda: T0)
    metrics.forget_partition(2)
    metrics.forget_partition(7)  # never seen: no error
    names = {name for name, labels in samples(metrics) if ("partition", "2") in labels}
    assert names == set()


def test_config_version_is_exported_as_info() -> None:
    """The config in force is one info series labelled with its version, replaced on a swap."""
    metrics = RulesMetrics()
    metrics.set_config("pg-aaaa")
    metrics.set_config("pg-bbbb")
    page = samples(metrics)
    assert value(page, "vigil_rules_config_info", config_version="pg-bbbb") == 1.0
    assert ("vigil_rules_config_info", (("config_version", "pg-aaaa"),)) not in page


async def test_config_watch_counts_reload_failures_and_swaps() -> None:
    """A failing load moves the failures counter; a changed config taken in moves swaps; an
    unchanged one moves neither."""
    metrics = RulesMetrics()
    loads: list[RulesConfig | Exception] = [
        RuntimeError("postgres down"),
        RulesConfig(config_version="v-old"),
        RulesConfig(config_version="v-new"),
    ]

    async def load() -> RulesConfig:
        item = loads.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    watch = ConfigWatch(load, RulesConfig(config_version="v-old"), interval_s=5, metrics=metrics)
    assert await watch.check_once() is None
    assert await watch.check_once() is None
    assert watch.take() is None
    assert await watch.check_once() is not None
    assert watch.take() is not None
    page = samples(metrics)
    assert value(page, "vigil_rules_config_reload_failures_total") == 1.0
    assert value(page, "vigil_rules_config_swaps_total") == 1.0
    assert (watch.failures, watch.swaps) == (1, 1)


def test_ops_port_defaults_to_9102_and_accepts_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """VIGIL_RULES_OPS_PORT: 9102 by default (ingest has 9101), 0 asks for a free port."""
    monkeypatch.delenv("VIGIL_RULES_OPS_PORT", raising=False)
    assert RulesSettings().ops_port == 9102
    assert RulesSettings().ops_host == "127.0.0.1"
    monkeypatch.setenv("VIGIL_RULES_OPS_PORT", "0")
    assert RulesSettings().ops_port == 0
