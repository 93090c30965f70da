"""Rules' and notify's /readyz report a Kafka outage while the service runs: each service's
``run`` is started with its processing loop replaced by a wait (so nothing else is needed), its
Kafka bootstrap server a fake Kafka broker this test stops and starts again."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import services.notify.app as notify_app
import services.rules.app as rules_app
from services.notify.settings import NotifySettings
from services.rules.settings import RulesSettings
from tests.broker_faults import free_port
from tests.polling import eventually
from tests.unit.test_dependency_outage import fake_kafka, readyz
from vigil.settings import KafkaSettings


async def idle(*args: Any) -> None:
    stop = next(a for a in args if isinstance(a, asyncio.Event))
    await stop.wait()


async def until(port: int, predicate: Any, within_s: float) -> tuple[int, str]:
    seen: list[tuple[int, str]] = []

    async def matching() -> tuple[int, str] | None:
        seen.append(await readyz(port))
        return seen[-1] if predicate(seen[-1]) else None

    return await eventually(
        matching,
        timeout_s=within_s,
        interval_s=0.1,
        what="/readyz to answer as expected",
        detail=lambda: f"still {seen[-1]}",
    )


@pytest.mark.parametrize("service", ["rules", "notify"])
async def test_a_kafka_outage_turns_readyz_503_and_is_logged_once(
    service: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vigil.ops")
    kafka_port = free_port()
    kafka = await fake_kafka(port=kafka_port)
    bootstrap = KafkaSettings(bootstrap_servers=f"127.0.0.1:{kafka_port}")
    if service == "rules":
        monkeypatch.setattr(rules_app, "_consume", idle)
        settings: Any = RulesSettings(config_from_postgres=False, ops_port=0, kafka=bootstrap)
        runner = rules_app.run
    else:
        monkeypatch.setattr(notify_app, "_serve", idle)
        settings = NotifySettings(ops_port=0, kafka=bootstrap)
        runner = notify_app.run
    ports: list[int] = []
    listening = asyncio.Event()

    def listened(bound: int) -> None:
        ports.append(bound)
        listening.set()

    stop = asyncio.Event()
    task = asyncio.create_task(runner(settings, stop, listening=listened))
    try:
        await asyncio.wait_for(listening.wait(), 10)
        port = ports[0]
        # Up: whatever the service says of itself, not a Kafka outage (positive control).
        _, body = await until(port, lambda s: True, 5)
        assert not body.startswith("kafka unreachable"), body
        kafka.close()
        await kafka.wait_closed()
        _, body = await until(port, lambda s: s[0] == 503 and "kafka" in s[1], 10)
        assert body.startswith("kafka unreachable"), body
        await asyncio.sleep(2.5)  # more failed probes, no more log lines
        kafka = await fake_kafka(port=kafka_port)
        await until(port, lambda s: not s[1].startswith("kafka unreachable"), 10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        kafka.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "vigil.ops"]
    assert [m for m in lines if m.startswith("dependency_")] == [
        "dependency_unavailable",
        "dependency_recovered",
    ]
