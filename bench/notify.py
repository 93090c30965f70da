"""Benchmark of notify's escalation path against the local stack's PostgreSQL.

Phase ``latency``: alerts handed to the escalation service at a paced rate (default 100/s); the
figure is alert-in-hand -> the first delivery attempt's time (``delivery_attempts.at``: when
the provider answered), with the channel a local PagerDuty-shaped webhook server (or the SMTP
sink with ``--channel email``). The service runs as in the notify process: its pool (size and
reset) and its start-up heap frozen (``vigil.runtime.freeze_start_up_heap``). It runs with the
notify service's own ``group_wait_s`` setting (5 s unless ``VIGIL_NOTIFY_GROUP_WAIT_S`` says
otherwise): each alert is a patient's first, which bundling pages at once. The same load is
measured again with bundling off (``latency_bundling_off``) in the same run, and the bare
provider round trip at the same rate is the baseline, so the ratios are what notify adds and
what bundling adds.

Phase ``burst``: patients each get two alerts ``--burst-gap-s`` apart inside the window, with
the service's loops running on the real clock: the first alert's first attempt latency, and how
long after the window's end the follow-up's first attempt was recorded.

Phase ``ticking``: 10,000 open escalations whose next step falls due spread over a window; the
ticker runs on the real clock and the figure is the lag between a step's due time and when it
fired, plus how many due steps had not fired when the window closed (falling behind).

Prints progress to stderr and ONE JSON line of figures at the end. Leaves no open escalation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from bench.common import percentile, stack_environment
from schemas.events import (
    Alert,
    AlertKind,
    AlertPhase,
    AlertPriority,
    AlertState,
    Evidence,
)
from services.notify.adapters.pagerduty import PagerDutyEvents
from services.notify.adapters.postgres import PostgresNotifyRepository
from services.notify.adapters.postgres.unit_of_work import unit_of_work_factory
from services.notify.adapters.smtp import SmtpSender
from services.notify.bootstrap import keep_session
from services.notify.service_layer.escalation import (
    EscalationConfig,
    EscalationService,
)
from services.notify.settings import NotifySettings
from tests.support.notify import SmtpSink
from vigil.db.migrate import apply_migrations
from vigil.runtime import freeze_start_up_heap, utcnow


def _alert(patient: str, at: datetime, code: str = "FEVER") -> Alert:
    dedup_key = f"{patient}:bench:{code}"
    return Alert(
        alert_id=uuid.uuid5(uuid.NAMESPACE_URL, f"{dedup_key}:start"),
        dedup_key=dedup_key,
        patient_id=patient,
        device_id=f"dev-{patient}",
        kind=AlertKind.PHYSIOLOGICAL,
        code=code,
        priority=AlertPriority.HIGH,
        phase=AlertPhase.START,
        state=AlertState.ACTIVE,
        title="Fever 38.6 °C",
        device_time=at,
        ingest_time=at,
        evidence=(
            Evidence(
                name="temperature",
                value=38.6,
                unit="°C",
                limit=38.3,
                comparator=">=",
                device_time=at,
            ),
        ),
        rule_id="fever.single",
        rule_version="1",
    )


async def _team(pool: Any, team: str, channel: str, address: str, wait_s: int) -> None:
    person = f"{team}-primary"
    await pool.execute(
        "INSERT INTO care_teams (care_team_id, name, oncall_email) VALUES ($1, 'bench', $2)",
        team,
        f"{team}@bench.test",
    )
    await pool.execute(
        "INSERT INTO people (person_id, name, care_team_id) VALUES ($1, 'p', $2)", person, team
    )
    await pool.execute(
        "INSERT INTO contact_methods (person_id, rank, channel, address) VALUES ($1, 0, $2, $3)",
        person,
        channel,
        address,
    )
    steps = [{"wait_s": wait_s, "targets": [{"kind": "person", "ref": person}]}]
    await pool.execute(
        "INSERT INTO escalation_policies (policy_id, care_team_id, name, steps, repeat_count) "
        "VALUES ($1, $1, 'bench', $2::jsonb, 100)",
        team,
        json.dumps(steps),
    )


def _service(
    pool: Any, *, webhook_url: str, smtp_port: int, group_wait_s: float
) -> EscalationService:
    return EscalationService(
        unit_of_work=unit_of_work_factory(pool),
        alerts=PostgresNotifyRepository(pool),
        email=SmtpSender(host="127.0.0.1", port=smtp_port, envelope_from="bench@localhost"),
        sms=None,
        webhook=PagerDutyEvents(base_url=webhook_url),
        config=EscalationConfig(
            sender_address="bench@localhost",
            public_base_url="http://127.0.0.1:8085",
            ack_secret=b"bench-only-secret-bench-only-secret",
            batch=500,
            group_wait_s=group_wait_s,
        ),
        clock=utcnow,
    )


async def _close(pool: Any, team: str) -> None:
    # A follow-up still pending would be paged by the next ticker that sees it due.
    await pool.execute(
        "UPDATE notify_bundles SET status = 'flushed' WHERE care_team_id = $1 "
        "AND status = 'pending'",
        team,
    )
    await pool.execute(
        "DELETE FROM notify_bundle_windows WHERE patient_id IN "
        "(SELECT patient_id FROM patients WHERE care_team_id = $1)",
        team,
    )
    await pool.execute(
        """
        WITH closed AS (
            UPDATE escalations SET status = 'resolved', due_at = NULL
            WHERE care_team_id = $1 RETURNING escalation_id
        )
        UPDATE pages SET status = 'cancelled', next_attempt_at = NULL
        WHERE escalation_id IN (SELECT escalation_id FROM closed)
          AND status IN ('queued', 'failed', 'sending')
        """,
        team,
    )


async def _first_attempts(pool: Any, team: str) -> dict[str, datetime]:
    """Each alert's first delivery attempt: its own page's, or its bundle page's."""
    rows = await pool.fetch(
        """
        SELECT m.dedup_key, MIN(d.at) AS first_at
        FROM pages p
        JOIN delivery_attempts d ON d.page_id = p.page_id
        LEFT JOIN notify_bundle_members m ON m.bundle_id = p.bundle_id
        WHERE p.care_team_id = $1 AND p.bundle_id IS NOT NULL
        GROUP BY m.dedup_key
        UNION ALL
        SELECT p.dedup_key, MIN(d.at) AS first_at
        FROM pages p JOIN delivery_attempts d ON d.page_id = p.page_id
        WHERE p.care_team_id = $1 AND p.bundle_id IS NULL
        GROUP BY p.dedup_key
        """,
        team,
    )
    return {str(r["dedup_key"]): r["first_at"] for r in rows}


async def latency_phase(
    pool: Any, args: argparse.Namespace, webhook: _Endpoint, smtp: SmtpSink, group_wait_s: float
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    team = f"CT-bench-{run}"
    address = f"rk-{run}" if args.channel == "webhook" else f"oncall-{run}@bench.test"
    await _team(pool, team, args.channel, address, wait_s=3600)
    count = int(args.rate * args.seconds)
    patients = [f"P-bench-{run}-{i}" for i in range(count)]
    await pool.executemany(
        "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)",
        [(p, team) for p in patients],
    )
    service = _service(
        pool, webhook_url=webhook.url, smtp_port=smtp.port, group_wait_s=group_wait_s
    )
    started: dict[str, datetime] = {}
    tasks: list[asyncio.Task[bool]] = []
    t0 = time.monotonic()
    try:
        for i, patient in enumerate(patients):
            delay = t0 + i / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            alert = _alert(patient, utcnow())
            started[alert.dedup_key] = utcnow()
            tasks.append(asyncio.create_task(service.handle_alert(alert)))
        await asyncio.gather(*tasks)
        offered_s = time.monotonic() - t0
        first = await _first_attempts(pool, team)
        latencies = [
            (at - started[key]).total_seconds() * 1000
            for key, at in first.items()
            if key in started
        ]
    finally:
        await _close(pool, team)
    p99 = percentile(latencies, 99)
    return {
        "channel": args.channel,
        "group_wait_s": group_wait_s,
        "alerts": count,
        "offered_rate_per_s": round(count / offered_s, 1),
        "first_attempts_recorded": len(latencies),
        "first_attempt_p50_ms": _r(percentile(latencies, 50)),
        "first_attempt_p99_ms": _r(p99),
        "first_attempt_max_ms": _r(max(latencies, default=None)),
        "target_p99_ms": 100,
        "target_met": p99 is not None and p99 <= 100 and len(latencies) == count,
    }


async def baseline_phase(
    args: argparse.Namespace, webhook: _Endpoint, smtp: SmtpSink
) -> dict[str, Any]:
    """The provider round trip alone, paced the same way as the latency phase."""
    run = uuid.uuid4().hex[:8]
    count = int(args.rate * args.seconds)
    baseline: list[float] = []
    client = PagerDutyEvents(base_url=webhook.url)
    sender = SmtpSender(host="127.0.0.1", port=smtp.port, envelope_from="bench@localhost")

    async def one(i: int) -> None:
        begin = time.perf_counter()
        if args.channel == "webhook":
            await client.enqueue(
                {
                    "routing_key": "rk-baseline",
                    "event_action": "trigger",
                    "dedup_key": f"baseline-{run}-{i}",
                    "payload": {"summary": "s", "severity": "critical", "source": "bench"},
                }
            )
        else:
            from email.message import EmailMessage

            message = EmailMessage()
            message["Subject"] = "baseline"
            message.set_content("baseline")
            await sender.send(message, recipient="baseline@bench.test")
        baseline.append((time.perf_counter() - begin) * 1000)

    base_tasks = []
    b0 = time.monotonic()
    for i in range(count):
        delay = b0 + i / args.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        base_tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*base_tasks)
    await client.aclose()
    return {
        "baseline_provider_p50_ms": _r(percentile(baseline, 50)),
        "baseline_provider_p99_ms": _r(percentile(baseline, 99)),
    }


async def burst_phase(
    pool: Any, args: argparse.Namespace, webhook: _Endpoint, smtp: SmtpSink, group_wait_s: float
) -> dict[str, Any]:
    """Two alerts per patient inside the window: the first paged at once, the second in the
    follow-up at the window's end (on the service's real-clock loops)."""
    run = uuid.uuid4().hex[:8]
    team = f"CT-burst-{run}"
    await _team(pool, team, "webhook", f"rk-burst-{run}", wait_s=3600)
    patients = [f"P-burst-{run}-{i}" for i in range(args.burst_patients)]
    await pool.executemany(
        "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)",
        [(p, team) for p in patients],
    )
    service = _service(
        pool, webhook_url=webhook.url, smtp_port=smtp.port, group_wait_s=group_wait_s
    )
    stop = asyncio.Event()
    runner = asyncio.create_task(service.run(stop, interval_s=args.tick_s))
    started: dict[str, datetime] = {}
    try:

        async def patient_burst(i: int, patient: str) -> None:
            await asyncio.sleep(i / args.rate)
            for n, code in enumerate(("OCCLUSION", "INFUSION_STOPPED")):
                if n:
                    await asyncio.sleep(args.burst_gap_s)
                alert = _alert(patient, utcnow(), code)
                started[alert.dedup_key] = utcnow()
                await service.handle_alert(alert)

        await asyncio.gather(*(patient_burst(i, p) for i, p in enumerate(patients)))
        await asyncio.sleep(group_wait_s + 2 * args.tick_s)
        stop.set()
        await runner
        first = await _first_attempts(pool, team)
        windows = {
            str(r["patient_id"]): r["closes_at"]
            for r in await pool.fetch(
                "SELECT patient_id, closes_at FROM notify_bundle_windows "
                "WHERE patient_id = ANY($1::text[])",
                patients,
            )
        }
        follow_ups = await pool.fetchval(
            "SELECT count(DISTINCT bundle_id) FROM pages WHERE care_team_id = $1 "
            "AND bundle_id IS NOT NULL",
            team,
        )
    finally:
        stop.set()
        await _close(pool, team)
    immediate = [
        (first[k] - started[k]).total_seconds() * 1000
        for k in started
        if k.endswith(":OCCLUSION") and k in first
    ]
    after_window = [
        (first[k] - windows[k.split(":")[0]]).total_seconds() * 1000
        for k in started
        if k.endswith(":INFUSION_STOPPED") and k in first and k.split(":")[0] in windows
    ]
    waited = [
        (first[k] - started[k]).total_seconds() * 1000
        for k in started
        if k.endswith(":INFUSION_STOPPED") and k in first
    ]
    return {
        "patients": len(patients),
        "group_wait_s": group_wait_s,
        "gap_s": args.burst_gap_s,
        "first_alert_attempts": len(immediate),
        "first_alert_p50_ms": _r(percentile(immediate, 50)),
        "first_alert_p99_ms": _r(percentile(immediate, 99)),
        "follow_up_pages": int(follow_ups or 0),
        "follow_up_alerts_attempted": len(after_window),
        "follow_up_after_window_end_p50_ms": _r(percentile(after_window, 50)),
        "follow_up_after_window_end_p99_ms": _r(percentile(after_window, 99)),
        "follow_up_wait_max_ms": _r(max(waited, default=None)),
    }


async def ticking_phase(
    pool: Any, args: argparse.Namespace, webhook: _Endpoint, smtp: SmtpSink, group_wait_s: float
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    team = f"CT-tick-{run}"
    await _team(pool, team, "webhook", f"rk-tick-{run}", wait_s=3600)
    n = args.escalations
    now = utcnow()
    start = now + timedelta(seconds=5)
    window = args.tick_window_s
    snapshot = json.dumps(
        {
            "policy_id": team,
            "repeat_count": 100,
            "steps": [{"wait_s": 3600, "targets": [{"kind": "person", "ref": f"{team}-primary"}]}],
            "schedules": {},
        }
    )
    alerts, escalations = [], []
    for i in range(n):
        alert = _alert(f"P-tick-{run}-{i}", now)
        due = start + timedelta(seconds=window * i / n)
        alerts.append(
            (alert.alert_id, alert.dedup_key, alert.patient_id, alert.device_id, now, now)
        )
        escalations.append(
            (uuid.uuid4(), alert.dedup_key, alert.alert_id, alert.patient_id, team, snapshot, due)
        )
    await pool.executemany(
        """
        INSERT INTO alerts (alert_id, dedup_key, patient_id, device_id, kind, code, priority,
                            phase, state, title, device_time, ingest_time, evidence, rule_id,
                            rule_version)
        VALUES ($1, $2, $3, $4, 'physiological', 'FEVER', 'high', 'start', 'active', 'Fever',
                $5, $6, '[]'::jsonb, 'fever.single', '1')
        """,
        alerts,
    )
    await pool.executemany(
        """
        INSERT INTO escalations (escalation_id, dedup_key, alert_id, patient_id, care_team_id,
                                 snapshot, status, step_index, pass_no, due_at, opened_at)
        VALUES ($1, $2, $3, $4, $5, $6::jsonb, 'open', 0, 0, $7, $7)
        """,
        escalations,
    )
    print(json.dumps({"phase": "ticking", "open_escalations": n}), file=sys.stderr)
    service = _service(
        pool, webhook_url=webhook.url, smtp_port=smtp.port, group_wait_s=group_wait_s
    )
    stop = asyncio.Event()
    runner = asyncio.create_task(service.run(stop, interval_s=args.tick_s))
    end = start + timedelta(seconds=window)
    try:
        # The window plus two tick intervals: a step due at the very end still gets its tick.
        await asyncio.sleep((end - utcnow()).total_seconds() + 2 * args.tick_s)
        stop.set()
        await runner
        rows = await pool.fetch(
            """
            SELECT e.opened_at AS due, MIN(v.at) AS fired
            FROM escalations e
            LEFT JOIN escalation_events v
                ON v.escalation_id = e.escalation_id AND v.kind = 'step_fired'
            WHERE e.care_team_id = $1
            GROUP BY e.escalation_id, e.opened_at
            """,
            team,
        )
        sent = await pool.fetchval(
            "SELECT count(*) FROM pages WHERE care_team_id = $1 AND status = 'sent'", team
        )
    finally:
        stop.set()
        await _close(pool, team)
    lags = [(r["fired"] - r["due"]).total_seconds() * 1000 for r in rows if r["fired"]]
    not_fired = sum(1 for r in rows if r["fired"] is None)
    return {
        "open_escalations": n,
        "window_s": window,
        "steps_due_per_s": round(n / window, 1),
        "steps_fired": len(lags),
        "steps_not_fired_at_window_end": not_fired,
        "pages_sent": int(sent or 0),
        "tick_interval_s": args.tick_s,
        "fire_lag_p50_ms": _r(percentile(lags, 50)),
        "fire_lag_p99_ms": _r(percentile(lags, 99)),
        "fire_lag_max_ms": _r(max(lags, default=None)),
        "kept_up": not_fired == 0,
    }


@dataclass(frozen=True)
class _Endpoint:
    url: str


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if not value or not base else round(value / base, 2)


async def main_async(args: argparse.Namespace, webhook: _Endpoint) -> dict[str, Any]:
    env = stack_environment()
    dsn = env["VIGIL_PG_DSN"]
    await apply_migrations(dsn)
    # As the notify process: its start-up heap frozen out of the garbage collector's scans, and
    # its pool (the service's size unless --pool says otherwise, and its reset).
    freeze_start_up_heap()
    settings = NotifySettings()
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min(settings.pg.pool_min_size, args.pool or settings.pg.pool_max_size),
        max_size=args.pool or settings.pg.pool_max_size,
        reset=keep_session,
    )
    # The notify service's own setting (its default unless the environment overrides it).
    group_wait_s = settings.group_wait_s
    figures: dict[str, Any] = {"bench": "notify", "group_wait_s": group_wait_s}
    try:
        with SmtpSink() as smtp:
            # Discarded: the first pass of a run pays for cold connections and first-call costs
            # (asyncpg prepares each statement once per connection), which inflated whichever
            # measured pass came first; one pass with bundling and one without, so that the
            # statements of both paths are prepared on the pool's connections.
            warmup = argparse.Namespace(**(vars(args) | {"seconds": min(2.0, args.seconds)}))
            for wait_s in (group_wait_s, 0.0):
                warm = await latency_phase(pool, warmup, webhook, smtp, wait_s)
                print(json.dumps({"warmup": warm}), file=sys.stderr)
            latency = await latency_phase(pool, args, webhook, smtp, group_wait_s)
            print(json.dumps({"phase": latency}), file=sys.stderr)
            off = await latency_phase(pool, args, webhook, smtp, 0.0)
            print(json.dumps({"phase": off}), file=sys.stderr)
            base = await baseline_phase(args, webhook, smtp)
            p99, off_p99 = latency["first_attempt_p99_ms"], off["first_attempt_p99_ms"]
            base_p99 = base["baseline_provider_p99_ms"]
            latency |= base | {
                "p99_ratio_to_baseline": _ratio(p99, base_p99),
                "p99_ratio_to_bundling_off": _ratio(p99, off_p99),
            }
            figures["latency"] = latency
            figures["latency_bundling_off"] = off
            if args.burst_patients > 0 and group_wait_s > 0:
                figures["burst"] = await burst_phase(pool, args, webhook, smtp, group_wait_s)
                print(json.dumps({"phase": figures["burst"]}), file=sys.stderr)
            if args.escalations > 0:
                figures["ticking"] = await ticking_phase(pool, args, webhook, smtp, group_wait_s)
    finally:
        await pool.close()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="alerts per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--channel", choices=("webhook", "email"), default="webhook")
    parser.add_argument("--escalations", type=int, default=10_000)
    parser.add_argument("--tick-window-s", type=float, default=60.0)
    parser.add_argument("--tick-s", type=float, default=1.0)
    parser.add_argument(
        "--pool", type=int, default=None, help="pool size (default: the notify service's)"
    )
    parser.add_argument("--burst-patients", type=int, default=100)
    parser.add_argument("--burst-gap-s", type=float, default=1.0)
    args = parser.parse_args()
    # The webhook server runs in its own process: in this one it would compete with the
    # measured service for the interpreter lock and inflate the figures.
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.support.notify", "pagerduty"],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        webhook = _Endpoint(server.stdout.readline().strip())
        figures = asyncio.run(main_async(args, webhook))
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
