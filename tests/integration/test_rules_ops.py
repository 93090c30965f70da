"""The rules service's operations endpoint against the real stack: started as ``vigil rules``
runs it (in this process, on private topics, its ops server on a free port), ``/readyz`` turns
ready once the partition is assigned and restored, and one fever reading plus one unreadable
record move the counters scraped over HTTP by exactly what they should."""

from __future__ import annotations

import asyncio
import math
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.kafka_helpers import create_rules_topics, rules_settings
from tests.ops_scrape import Samples, http_get, label_values, scrape, value
from tests.polling import eventually
from tests.support.rules import Home
from vigil.kafka import encode, make_producer
from vigil.settings import KafkaSettings

pytestmark = pytest.mark.stack


async def test_rules_metrics_move_with_one_reading_and_readyz_turns_ready(
    stack_env: dict[str, str],
) -> None:
    """Before any record: ready, restore observed once, config info exported. After one
    38.6 °C reading and one unreadable record: 2 events consumed, 1 high fever alert, 1 dead
    letter, commits and batch sizes observed, lag 0, the watermark lag finite; and no label
    value names the patient or the device."""
    from services.rules.app import run as run_rules

    run = uuid.uuid4().hex[:8]
    patient = f"P-rulesops-{run}"
    kafka = KafkaSettings()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    names = await create_rules_topics(admin, f"rulesops.{run}")
    settings = rules_settings(
        names,
        group_id=f"rules-opstest-{run}",
        config_reload_s=0,
        ops_port=0,
    )
    home = Home(patient, datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5))
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    service = asyncio.create_task(run_rules(settings, stop, listening=port.set_result))
    producer = make_producer(kafka, f"rulesops-{run}")
    await producer.start()

    async def page() -> Samples:
        if service.done():
            service.result()  # surface a failure of the service as the error it is
        return await scrape(ops_port)

    try:
        ops_port = await asyncio.wait_for(port, 30)
        assert (await http_get(ops_port, "/healthz"))[0] == 200

        async def ready() -> bool:
            if service.done():
                service.result()
            return (await http_get(ops_port, "/readyz"))[0] == 200

        await eventually(ready, timeout_s=60, interval_s=0.25, what="/readyz to turn ready")
        before = await page()
        assert value(before, "vigil_rules_state_restore_seconds_count") == 1
        assert value(before, "vigil_rules_config_info", config_version=_version(before)) == 1
        assert value(before, "vigil_rules_events_consumed_total") == 0

        await producer.send_and_wait(names["telemetry"], encode(home.temp(0, 38.6)))
        await producer.send_and_wait(names["telemetry"], b'{"not": "telemetry"}')

        async def both_consumed() -> Samples | None:
            now = await page()
            return now if value(now, "vigil_rules_events_consumed_total") >= 2 else None

        await eventually(
            both_consumed, timeout_s=60, interval_s=0.25, what="both records to be committed"
        )

        async def caught_up() -> Samples | None:
            # The lag gauge is refreshed at most once a second, so it may trail the commit.
            now = await page()
            lag = now.get(("vigil_rules_consumer_lag", (("partition", "0"),)))
            return now if lag == 0 else None

        after = await eventually(
            caught_up,
            timeout_s=60,
            interval_s=0.25,
            what="the lag gauge to show the partition caught up",
        )
        assert isinstance(after, dict)
        assert value(after, "vigil_rules_events_consumed_total") == 2
        alerts = value(after, "vigil_rules_alerts_emitted_total", priority="high", rule_id="fever")
        assert alerts == 1
        dead = value(after, "vigil_rules_dead_letters_total", reason="telemetry_contract")
        assert dead == 1
        batches = value(after, "vigil_rules_batch_size_count")
        assert batches >= 1 and value(after, "vigil_rules_batch_size_sum") == 2
        assert value(after, "vigil_rules_commit_seconds_count") == batches
        lag = value(after, "vigil_rules_watermark_lag_seconds", partition="0")
        assert not math.isnan(lag) and lag > 0
        assert value(after, "vigil_rules_transaction_aborts_total") == 0
        for forbidden in (patient, home.thermometer_id):
            assert not any(forbidden in v for v in label_values(after)), forbidden
        assert (await http_get(ops_port, "/readyz"))[0] == 200
    finally:
        await producer.stop()
        stop.set()
        await asyncio.wait_for(asyncio.gather(service, return_exceptions=True), 30)
        await admin.delete_topics(list(names.values()))
        await admin.close()
    if service.done() and not service.cancelled():
        service.result()


def _version(samples: Samples) -> str:
    (version,) = {
        v for (name, labels) in samples if name == "vigil_rules_config_info" for _, v in labels
    }
    return version
