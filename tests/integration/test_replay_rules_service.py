"""The real rules service decides, then a replay reproduces it: same alerts, same ids.

The rules service runs in this process against private topics (telemetry, alerts, state,
dead letters) created for this run, so no other test's services see its records. It pins its
config to its state topic; the replay loads that very config by the ``config_version`` the
alerts carry and compares its decisions with the alerts the service published.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from schemas.events import Alert
from services.rules.settings import RulesSettings
from tests.broker_faults import free_port
from tests.kafka_helpers import create_rules_topics, rules_settings
from tests.polling import eventually, until_ready
from vigil.kafka import encode, make_producer
from vigil.settings import KafkaSettings
from vigil_tools.replay.service import ReplayRequest, RulesChoice, run_replay
from vigil_tools.replay.sources import topic_partitions
from vigil_tools.replay.synthetic import FeverEpisode, PumpPause, course

pytestmark = pytest.mark.stack


@dataclass
class LiveRun:
    settings: RulesSettings
    patients: tuple[str, ...]
    alerts: list[Alert]
    events: int
    start: datetime


async def read_all(topic: str) -> list[bytes]:
    bootstrap = KafkaSettings().bootstrap_servers
    tps = [TopicPartition(topic, p) for p in await topic_partitions(bootstrap, topic)]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            for records in (await consumer.getmany(*pending, timeout_ms=1000)).values():
                values += [r.value for r in records if r.value is not None]
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()
    return values


async def consumed_everything(admin: AIOKafkaAdminClient, group: str, topic: str) -> bool:
    bootstrap = KafkaSettings().bootstrap_servers
    tps = [TopicPartition(topic, p) for p in await topic_partitions(bootstrap, topic)]
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await probe.start()
    try:
        ends = await probe.end_offsets(tps)
    finally:
        await probe.stop()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    except KafkaError:
        return False  # the group's coordinator is still being set up: not there yet
    return all(
        ends[tp] == 0 or (tp in committed and committed[tp].offset >= ends[tp]) for tp in tps
    )


@pytest.fixture(scope="module")
async def live_run(stack_env: dict[str, str]) -> AsyncIterator[LiveRun]:
    """Three patients' two days through the real rules service."""
    from services.rules.app import run as run_rules

    run = uuid.uuid4().hex[:8]
    kafka = KafkaSettings()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    names = await create_rules_topics(admin, f"replaytest.{run}", partitions=3, keep=True)
    settings = rules_settings(
        names,
        group_id=f"rules-replaytest-{run}",
        config_from_postgres=False,
        ops_port=free_port(),
    )
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=3)
    patients = tuple(f"rs-{run}-{n}" for n in range(3))
    events = []
    for n, patient in enumerate(patients):
        events += course(
            patient,
            start + timedelta(minutes=3 * n),
            days=2,
            fevers=(FeverEpisode(timedelta(hours=20), timedelta(minutes=90), 38.1 + n / 10),),
            pauses=(PumpPause(timedelta(hours=30), timedelta(minutes=40)),),
        )
    events.sort(key=lambda e: e.ingest_time)
    stop = asyncio.Event()
    service = asyncio.create_task(run_rules(settings, stop))
    producer = make_producer(kafka, f"replaytest-{run}")
    try:
        # Joined its group, partitions assigned and restored.
        await until_ready(settings.ops_port, what="rules", tasks=[service])
        await producer.start()
        await asyncio.gather(
            *[
                await producer.send(
                    names["telemetry"],
                    encode(e),
                    key=e.patient_id.encode(),
                    timestamp_ms=int(e.ingest_time.timestamp() * 1000),
                )
                for e in events
            ]
        )
        await producer.stop()

        async def consumed() -> bool:
            if service.done():
                service.result()  # surface a start-up failure as the error it is
            return await consumed_everything(admin, settings.group_id, names["telemetry"])

        await eventually(
            consumed, timeout_s=120, interval_s=0.5, what="the rules service to consume the stream"
        )
        alerts = [Alert.model_validate_json(v) for v in await read_all(names["alerts"])]
        yield LiveRun(settings, patients, alerts, len(events), start)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(service, return_exceptions=True), 30)
        await admin.delete_topics(list(names.values()))
        await admin.close()


async def test_replay_reproduces_every_alert_the_rules_service_published(
    live_run: LiveRun,
) -> None:
    """Replaying the telemetry topic under the config the service pinned (found by the
    config_version its alerts carry) decides exactly the alerts it published."""
    assert live_run.alerts, "the scripted stream should make the service page"
    versions = {a.config_version for a in live_run.alerts}
    assert len(versions) == 1
    (version,) = versions
    assert version is not None
    outcome = await run_replay(
        ReplayRequest(
            source="kafka",
            topic=live_run.settings.telemetry_topic,
            alerts_topic=live_run.settings.alerts_topic,
            state_topic=live_run.settings.state_topic,
            rules=RulesChoice(live=version),
            compare_recorded="topic",
            audit=False,
        )
    )
    assert outcome.stats.read == live_run.events
    assert outcome.recorded_diff is not None
    assert outcome.recorded_diff.identical, [
        i.as_dict() for i in outcome.recorded_diff.items if i.outcome != "same"
    ]
    assert outcome.recorded_diff.counts()["same"] == len(live_run.alerts)


async def test_a_single_patient_replay_reproduces_that_patients_alerts(
    live_run: LiveRun,
) -> None:
    """One patient, with the other records of its partition as context: exactly its alerts."""
    one = live_run.patients[1]
    version = live_run.alerts[0].config_version
    assert version is not None
    outcome = await run_replay(
        ReplayRequest(
            source="kafka",
            topic=live_run.settings.telemetry_topic,
            patient_ids=frozenset({one}),
            alerts_topic=live_run.settings.alerts_topic,
            state_topic=live_run.settings.state_topic,
            rules=RulesChoice(live=version),
            compare_recorded="topic",
            audit=False,
        )
    )
    mine = [a for a in live_run.alerts if a.patient_id == one]
    assert outcome.recorded_diff is not None and outcome.recorded_diff.identical
    assert outcome.recorded_diff.counts()["same"] == len(mine) > 0


async def test_a_replay_from_mid_stream_reproduces_what_the_service_published_from_then_on(
    live_run: LiveRun,
) -> None:
    """A window that starts half an hour into the fevers (by record time): after its warm-up
    the replay decides exactly the alerts the service published from the window on, among
    them sustained fevers that began before the window; the fever that had already paged is
    reported as open at the window start, not paged again."""
    version = live_run.alerts[0].config_version
    assert version is not None
    since = live_run.start + timedelta(hours=20, minutes=30)
    outcome = await run_replay(
        ReplayRequest(
            source="kafka",
            topic=live_run.settings.telemetry_topic,
            alerts_topic=live_run.settings.alerts_topic,
            state_topic=live_run.settings.state_topic,
            since=since,
            rules=RulesChoice(live=version),
            compare_recorded="topic",
            audit=False,
        )
    )
    assert outcome.recorded_diff is not None
    assert outcome.recorded_diff.identical, [
        i.as_dict() for i in outcome.recorded_diff.items if i.outcome != "same"
    ]
    published_from_then = {
        a.alert_id
        for a in live_run.alerts
        if a.alert_id not in {i.alert.alert_id for i in outcome.primary.warmup_alerts}
    }
    assert {i.alert.alert_id for i in outcome.primary.alerts} == published_from_then
    assert any(
        i.alert.code == "fever_sustained" and i.alert.phase.value == "start"
        for i in outcome.primary.alerts
    )
    open_fevers = [i for i in outcome.primary.open_at_start() if i.alert.rule_id == "fever"]
    assert open_fevers and all(i.alert.device_time < since for i in open_fevers)
