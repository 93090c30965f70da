"""Rules process: the ops server, then the consumer loop until a signal.

Telemetry in from Kafka, the pure engine (``domain``) in the middle, alerts out, in Kafka
transactions. The layers: ``domain`` (pure rules), ``service_layer`` (the batch and the
configuration swap, against ports), ``adapters`` (Kafka, PostgreSQL, metrics),
``entrypoints/consumer.py`` (the loop), ``bootstrap.py`` (the wiring). Delivery semantics are
in ``service_layer/batch.py`` and docs/rules.md.

Operations: ``RulesMetrics`` (``adapters/metrics.py``) is fed from the processing loop and
served with ``/healthz`` and ``/readyz`` by ``vigil.ops.OpsServer`` on
``VIGIL_RULES_OPS_HOST:VIGIL_RULES_OPS_PORT``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.rules.adapters.metrics import RulesMetrics, RulesReadiness
from services.rules.bootstrap import wire
from services.rules.entrypoints.consumer import serve
from services.rules.settings import RulesSettings
from vigil.ops import kafka_outage, serving_ops
from vigil.runtime import configure_logging, run_until_signalled

__all__ = ["main", "run"]


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
    await serve(await wire(settings, metrics, readiness), stop)


def main(argv: list[str] | None = None) -> int:
    settings = RulesSettings()
    configure_logging(settings.log_level)
    return run_until_signalled(lambda stop: run(settings, stop))
