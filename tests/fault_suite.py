"""Fault suite: paced QoS 1 readings from a hub with an outbox (the end-to-end acknowledgement of
docs/mqtt.md 4.1) through real ingest, rules and notify processes on the local stack named by the
``VIGIL_STACK_*`` environment; one fault after another; after each, a fever that must be paged
exactly once; one JSON line of figures; exit 1 on any reading answered as stored that is not in
PostgreSQL or not in Kafka, any reading never answered, and any fever not paged exactly once.

``python -m tests.fault_suite`` (``make test-faults``). The stack is started if it is not running
and stopped at the end if the suite started it. Its Kafka and PostgreSQL are faulted, so it must
be a stack nothing else is using. Each fault has a Mosquitto of its own (the stack's
configuration, a temporary directory, free loopback ports), its own ingest processes, devices and
patients; one rules and one notify process (consumer groups of the run's own, starting at the
current end of their topics) serve the whole run, restarted like a supervisor would if they exit.

Per fault: the hub publishes ``--rate`` readings a second for ``--seconds`` (longer for the
faults that last longer), the fault strikes a third of the way in; once every reading is
answered (or ``--settle-s`` passed) one fever reading (38.9 °C) is published for a patient of the
fault's own, then, once its page is in the stack's SMTP sink, a fever for a marker patient; once
the marker's page is in too, the fever's first pages and alerts are counted. Figures per fault:

- ``published``: distinct readings sent; ``puback``: of those, PUBACKed by the broker;
- ``answered``: answered as stored by ingest; ``resent``: copies the hub sent again because no
  answer came within ``--resend-after-s``; ``unanswered``: still in the outbox at the end;
- ``stored``: distinct readings in ``temperature_readings``; ``db_duplicates``: rows beyond one a
  reading; ``lost``: answered yet not stored;
- ``in_kafka``: distinct readings in the telemetry topic (from its end offsets before the load);
  ``kafka_duplicates``: records beyond one a reading; ``lost_kafka``: answered yet not in Kafka;
- ``resume_s``: from the fault to the first answer to a reading published 0.5 s or more after
  it (about 0.5 s when the fault did not interrupt ingest); ``ready_s``: from killing rules or
  notify until the new process's ``/readyz`` answered 200;
- ``fever_page_s``: from publishing the fever to its first page in the sink; ``fever_pages``:
  first pages about the fever patient (must be 1); ``fever_alerts``: alerts recorded as an
  episode's start for them (must be 1); ``marker_pages``: the positive control (must be 1);
- ``service_exits``: processes that exited by themselves and were restarted; ``seconds``: the
  fault's wall time; ``down_s``: how long Kafka or PostgreSQL was away.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt

from schemas.ack import ACK_PREFIX
from schemas.kafka_topics import ALERTS_TOPIC, TELEMETRY_TOPIC
from tests.broker_faults import OwnBroker, PacedPublisher
from tests.e2e.conftest import register_patient, start_group_at_end, temperature
from tests.factories import temperature_message
from tests.fault_checks import MailSink, alerts_started, telemetry_copies, telemetry_ends
from tests.fault_services import (
    Service,
    Supervisor,
    kill_kafka,
    start_postgres,
    stop_postgres,
)
from tests.integration.test_ingest_broker_restart import register
from tests.polling import eventually_sync
from vigil_tools.simulator.outbox import Outbox
from vigil_tools.stack.credentials import INGEST_MQTT_USER, SIM_MQTT_USER
from vigil_tools.stack.settings import StackSettings

FAULTS = (
    "graceful",
    "sigkill",
    "offline-restart",
    "ingest-sigkill",
    "share-sigkill",
    "kafka-sigkill",
    "postgres-down",
    "rules-sigkill",
    "notify-sigkill",
)
RESUME_PROBE_S = 0.5
FEVER_C = 38.9  # above the default single-reading fever limit (38.3 °C), below critical (39.5)


def reading(device: str, seq: int) -> bytes:
    message = temperature_message(device, 37.0, seq=seq, unit="C", site="oral")
    return json.dumps(message).encode()


class OutboxPublisher(PacedPublisher):
    """The reference hub: PacedPublisher (QoS 1, persistent session, resend after reconnect)
    plus the outbox of docs/mqtt.md 4.1, settled by ingest's answers on vigil/v1/ack/+. Each
    device counts its own ``seq`` from 1, as a device does (rules count gaps per device)."""

    def __init__(
        self,
        port: int,
        username: str,
        password: str,
        client_id: str,
        device_ids: list[str],
        rate: float,
        resend_after_s: float,
    ) -> None:
        super().__init__(port, username, password, client_id, device_ids, rate, payload=reading)
        self.outbox = Outbox(resend_after_s)
        self.answered: dict[str, int] = {}  # message_id -> answer time (ns)
        self.rejected = 0
        self.seqs = dict.fromkeys(device_ids, 0)
        self._box = threading.Lock()
        self.client.on_message = self._on_answer

        def on_connect(client: mqtt.Client, *args: Any) -> None:
            self._on_connect(client, *args)
            client.subscribe(f"{ACK_PREFIX}/+", qos=1)

        self.client.on_connect = on_connect
        self._resender = threading.Thread(target=self._resend_loop, daemon=True)

    def _on_answer(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        document = json.loads(message.payload)
        now = time.monotonic_ns()
        with self._box:
            settled = self.outbox.settle(document)
            self.rejected += len(settled.rejected)
        for stored in document.get("stored", ()):
            self.answered.setdefault(stored["message_id"], now)

    def publish_one(self, device: str, body: bytes, message_id: str, seq: int) -> None:
        topic = f"vigil/v1/dev/{device}/temperature"
        with self._box:
            self.outbox.add(device, message_id, seq, topic, body, time.monotonic())
        with self._lock:
            self.counts.published[message_id] = time.monotonic_ns()
        info = self.client.publish(topic, body, qos=1)
        with self._lock:
            if info.mid in self._early:
                self._settle(message_id, self._early.pop(info.mid))
            else:
                self._mid_to_id[info.mid] = message_id

    def publish_other(self, device: str, body: bytes) -> str:
        """Send one reading of another device through the outbox, outside the load's counts."""
        message_id = str(json.loads(body)["message_id"])
        with self._box:
            topic = f"vigil/v1/dev/{device}/temperature"
            self.outbox.add(device, message_id, 1, topic, body, time.monotonic())
        self.client.publish(f"vigil/v1/dev/{device}/temperature", body, qos=1)
        return message_id

    def _run(self, seconds: float) -> None:
        if not self._resender.is_alive():
            self._resender.start()
        interval = 1.0 / self.rate
        started = time.monotonic()
        n = 0
        while not self._stop.is_set():
            due = started + n * interval
            if due - started >= seconds:
                break
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            device = self.device_ids[n % len(self.device_ids)]
            self.seqs[device] += 1
            body = reading(device, self.seqs[device])
            self.publish_one(device, body, json.loads(body)["message_id"], self.seqs[device])
            n += 1

    def _resend_loop(self) -> None:
        while not self._stop.wait(0.5):
            with self._box:
                due = self.outbox.due(time.monotonic())
            for entry in due:
                self.client.publish(entry.topic, entry.payload, qos=1)

    def unanswered(self) -> int:
        with self._box:
            return len(self.outbox)


@dataclass
class Run:
    """What every fault shares: the stack, the long-running services, the sink, the options."""

    settings: StackSettings
    env: dict[str, str]
    args: argparse.Namespace
    logs: Path
    supervisor: Supervisor
    rules: Service
    notify: Service
    mail: MailSink
    fevers: dict[str, str]  # fault -> the fever patient


def ingest_service(run: Run, broker: OwnBroker, client_id: str, group: str) -> Service:
    env = {
        **run.env,
        "VIGIL_MQTT_HOST": "127.0.0.1",
        "VIGIL_MQTT_PORT": str(broker.port),
        "VIGIL_INGEST_MQTT_USERNAME": INGEST_MQTT_USER,
        "VIGIL_INGEST_MQTT_PASSWORD": broker.secrets.mqtt_ingest_password,
        "VIGIL_INGEST_MQTT_CLIENT_ID": client_id,
        "VIGIL_INGEST_MQTT_SHARE_GROUP": group,
        "VIGIL_INGEST_LOG_LEVEL": "WARNING",
    }
    return Service("ingest", client_id, env, run.logs)


def inject(fault: str, run: Run, broker: OwnBroker, ingests: list[Service]) -> dict[str, float]:
    """Strike ``fault`` and repair it; returns how long Kafka or PostgreSQL was away
    (``down_s``), or how long a killed rules or notify took to be ready again (``ready_s``)."""
    args = run.args
    if fault in ("graceful", "sigkill"):
        broker.stop(signal.SIGTERM if fault == "graceful" else signal.SIGKILL)
        time.sleep(2.0)  # the broker stays down this long
        broker.start()
    elif fault == "offline-restart":
        ingests[0].stop()
        time.sleep(1.0)
        broker.stop(signal.SIGTERM)
        time.sleep(2.0)
        broker.start()
        time.sleep(max(0.0, args.away_s - 3.0))  # ingest stays away this long in all
        ingests[0].start()
    elif fault == "ingest-sigkill":
        ingests[0].kill_and_restart()
    elif fault == "share-sigkill":
        for ingest in ingests:
            ingest.kill_and_restart()
    elif fault == "kafka-sigkill":
        return {"down_s": round(kill_kafka(run.settings), 1)}
    elif fault == "postgres-down":
        stopped = time.monotonic()
        stop_postgres(run.settings)
        time.sleep(args.postgres_down_s)  # the outage's length
        start_postgres(run.settings)
        return {"down_s": round(time.monotonic() - stopped, 1)}
    elif fault in ("rules-sigkill", "notify-sigkill"):
        killed = time.monotonic()
        (run.rules if fault == "rules-sigkill" else run.notify).kill_and_restart()
        return {"ready_s": round(time.monotonic() - killed, 1)}
    else:
        raise ValueError(f"unknown fault {fault!r}")
    return {}


def check_fever(
    run: Run,
    publisher: OutboxPublisher,
    fault: str,
    fever: tuple[str, str],
    marker: tuple[str, str],
) -> dict[str, Any]:
    """A fever after the fault: paged once, one alert; the marker's page closes the window."""
    figures: dict[str, Any] = {}
    patient, device = fever
    sent = time.monotonic()
    publisher.publish_other(device, temperature(device, FEVER_C, 1))
    try:
        run.mail.wait_first_page(patient, run.args.page_timeout_s)
        figures["fever_page_s"] = round(time.monotonic() - sent, 2)
        marker_patient, marker_device = marker
        publisher.publish_other(marker_device, temperature(marker_device, FEVER_C, 1))
        run.mail.wait_first_page(marker_patient, run.args.page_timeout_s)
    except TimeoutError as exc:
        figures["page_timeout"] = str(exc)
    figures["fever_pages"] = len(run.mail.first_pages(patient))
    figures["fever_alerts"] = asyncio.run(alerts_started(run.env["VIGIL_PG_DSN"], patient))
    figures["marker_pages"] = len(run.mail.first_pages(marker[0]))
    run.fevers[fault] = patient
    return figures


async def stored_rows(dsn: str, devices: list[str]) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT message_id::text AS id, count(*) AS n FROM temperature_readings "
            "WHERE device_id = ANY($1) GROUP BY 1",
            devices,
        )
    finally:
        await conn.close()
    return {r["id"]: r["n"] for r in rows}


async def register_fault(dsn: str, tag: str, devices: list[str]) -> tuple[tuple[str, str], ...]:
    await register(dsn, tag, devices)
    fever = await register_patient(dsn, tag, "fever")
    marker = await register_patient(dsn, tag, "marker")
    return (fever[0], fever[1]), (marker[0], marker[1])


def run_fault(fault: str, run: Run) -> dict[str, Any]:
    args = run.args
    data = Path(tempfile.mkdtemp(prefix=f"vigil-faults-{fault}-"))
    os.chmod(data, 0o755)  # as root the broker drops to its own user
    broker = OwnBroker(data)
    tag = uuid.uuid4().hex[:8]
    devices = [f"flt-{tag}-{i}" for i in range(4)]
    dsn = run.env["VIGIL_PG_DSN"]
    bootstrap = run.env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    fever, marker = asyncio.run(register_fault(dsn, tag, devices))
    shared = fault == "share-sigkill"
    group = f"vigil-ingest-{tag}" if shared else ""
    ingests = [
        run.supervisor.watch(ingest_service(run, broker, f"ingest-{tag}-{i}", group))
        for i in range(2 if shared else 1)
    ]
    publisher = OutboxPublisher(
        0, SIM_MQTT_USER, "", f"hub-{tag}", devices, args.rate, args.resend_after_s
    )
    seconds = args.seconds + {
        "offline-restart": args.away_s,
        "postgres-down": args.postgres_down_s,
    }.get(fault, 0.0)
    started = time.monotonic()
    fault_at = time.monotonic_ns()
    since = telemetry_ends(bootstrap)
    exits_before = {s.label: len(s.exits) for s in (run.rules, run.notify)}
    figures: dict[str, Any] = {"fault": fault}
    try:
        broker.start()
        publisher._port = broker.port
        publisher.client.username_pw_set(SIM_MQTT_USER, broker.secrets.mqtt_sim_password)
        for ingest in ingests:
            ingest.start()
        publisher.connect()
        publisher.start(seconds)
        time.sleep(args.seconds / 3)
        fault_at = time.monotonic_ns()
        figures |= inject(fault, run, broker, ingests)
        publisher.join()
        try:
            eventually_sync(
                lambda: publisher.unanswered() == 0,
                timeout_s=args.settle_s,
                interval_s=0.02,
                what="every reading answered",
            )
        except TimeoutError as exc:
            figures["settle_timeout"] = str(exc)
        figures |= check_fever(run, publisher, fault, fever, marker)
        # The fever's and the marker's answers too (a page can overtake its reading's answer).
        try:
            eventually_sync(
                lambda: publisher.unanswered() == 0,
                timeout_s=args.settle_s,
                interval_s=0.02,
                what="the fevers answered",
            )
        except TimeoutError as exc:
            figures["settle_timeout"] = str(exc)
    finally:
        publisher.close()
        for ingest in ingests:
            run.supervisor.forget(ingest)
            ingest.stop()
        broker.stop(signal.SIGTERM)
        shutil.rmtree(data, ignore_errors=True)
    rows = asyncio.run(stored_rows(dsn, devices))
    published = publisher.counts.published
    in_kafka = telemetry_copies(bootstrap, since, published)
    answered = set(publisher.answered) & set(published)
    figures |= {
        "published": len(published),
        "puback": len(publisher.counts.acked),
        "answered": len(answered),
        "resent": publisher.outbox.resent,
        "unanswered": publisher.unanswered(),
        "rejected": publisher.rejected,
        "stored": len(set(rows) & set(published)),
        "db_duplicates": sum(n - 1 for n in rows.values()),
        "lost": len(answered - set(rows)),
        "in_kafka": len(in_kafka),
        "kafka_duplicates": sum(n - 1 for n in in_kafka.values()),
        "lost_kafka": len(answered - set(in_kafka)),
        "seconds": round(time.monotonic() - started, 1),
    }
    exits = {s.label: len(s.exits) for s in ingests} | {
        s.label: len(s.exits) - exits_before[s.label] for s in (run.rules, run.notify)
    }
    if any(exits.values()):
        figures["service_exits"] = {name: n for name, n in exits.items() if n}
    if (resumed := resume_ns(published, publisher.answered, fault_at)) is not None:
        figures["resume_s"] = round((resumed - fault_at) / 1e9, 2)
    return figures


def resume_ns(published: dict[str, int], answered: dict[str, int], fault_at: int) -> int | None:
    """When the pipeline answered again: the first answer to a reading published at least
    ``RESUME_PROBE_S`` after the fault struck (one published sooner may have slipped through
    before the fault took effect). Times in monotonic ns; None when no such reading was answered.
    """
    probe = fault_at + int(RESUME_PROBE_S * 1e9)
    after = [answered[m] for m, t in published.items() if t >= probe and m in answered]
    return min(after) if after else None


def failures(result: dict[str, Any]) -> list[str]:
    """Why a fault's figures fail the suite (empty: they pass)."""
    if "error" in result:
        return [result["error"]]
    reasons = [name for name in ("lost", "lost_kafka", "unanswered") if result.get(name)]
    if not result.get("answered"):
        reasons.append("nothing answered")
    for name in ("fever_pages", "fever_alerts", "marker_pages"):
        if result.get(name) != 1:
            reasons.append(f"{name}={result.get(name)}")
    return reasons


def start_run(settings: StackSettings, args: argparse.Namespace) -> Run:
    from vigil_tools.stack import stack_env

    env = stack_env(settings)
    tag = uuid.uuid4().hex[:8]
    logs = settings.data_dir / "fault-suite" / tag
    logs.mkdir(parents=True, exist_ok=True)
    bootstrap = env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    rules_env = {
        **env,
        "VIGIL_RULES_GROUP_ID": f"rules-faults-{tag}",
        "VIGIL_RULES_TRANSACTIONAL_ID": f"rules-faults-{tag}",
    }
    notify_env = {**env, "VIGIL_NOTIFY_GROUP_ID": f"notify-faults-{tag}"}

    async def groups_at_end() -> None:
        # The run's services read what it produces, not what earlier runs left in the topics.
        await start_group_at_end(bootstrap, rules_env["VIGIL_RULES_GROUP_ID"], TELEMETRY_TOPIC)
        await start_group_at_end(bootstrap, notify_env["VIGIL_NOTIFY_GROUP_ID"], ALERTS_TOPIC)

    asyncio.run(groups_at_end())
    supervisor = Supervisor()
    rules = supervisor.watch(Service("rules", "rules", rules_env, logs))
    notify = supervisor.watch(Service("notify", "notify", notify_env, logs))
    mail = MailSink(settings.mail_dir)
    mail.refresh()
    rules.start()
    notify.start()
    supervisor.start()
    return Run(settings, env, args, logs, supervisor, rules, notify, mail, {})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fault_suite", description=__doc__)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--away-s", type=float, default=60.0)
    parser.add_argument("--postgres-down-s", type=float, default=20.0)
    parser.add_argument("--resend-after-s", type=float, default=10.0)
    parser.add_argument("--settle-s", type=float, default=60.0)
    parser.add_argument("--page-timeout-s", type=float, default=60.0)
    args = parser.parse_args()
    if not os.environ.get("VIGIL_STACK_DATA_DIR"):
        # The suite kills the stack's Kafka and stops its PostgreSQL: never a stack by default.
        sys.exit("set the VIGIL_STACK_* variables to a stack nothing else uses (make test-faults)")
    faults = [f for f in args.faults.split(",") if f]
    if unknown := set(faults) - set(FAULTS):
        sys.exit(f"unknown faults: {', '.join(sorted(unknown))}")
    # `timeout` and Ctrl-C stop the run through its finally blocks, which stop its processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from vigil_tools.stack import down, status, up

    settings = StackSettings()
    was_running = any(c["running"] for c in status(settings).values())
    up(settings)
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    run: Run | None = None
    try:
        run = start_run(settings, args)
        for fault in faults:
            try:
                results.append(run_fault(fault, run))
            except Exception as exc:  # reported in the JSON line; the stack may be broken now
                results.append({"fault": fault, "error": f"{type(exc).__name__}: {exc}"})
                break
        # The whole run is the last window: no second first page arrived for any fever since.
        for result in results:
            if "error" in result:
                continue
            later = len(run.mail.first_pages(run.fevers[result["fault"]]))
            if later != result["fever_pages"]:
                result["fever_pages_at_end"] = later
                result["fever_pages"] = later
    finally:
        if run is not None:
            run.supervisor.close()
        if not was_running:
            down(settings)
    failed = {r["fault"]: why for r in results if (why := failures(r))}
    line = {
        "faults": results,
        "failed": failed,
        "rate": args.rate,
        "minutes": round((time.monotonic() - started) / 60, 1),
    }
    print(json.dumps(line), flush=True)
    sys.exit(1 if failed or len(results) != len(faults) else 0)


if __name__ == "__main__":
    main()
