"""``vigil replay``: re-run a recorded stream through pinned rules; compare; report.

    vigil replay (--kafka | --archive) (--patient P | --device D | --care-team T | --all)
                 [--since T] [--until T] [--offsets 0:100-200,1:0-] [--order device|ingest]
                 [--warmup-since T | --no-warmup]
                 [--config FILE | --config-version HASH | --config-at T]
                 [--against-config FILE | --against-version HASH | --what-if KEY=VALUE ...]
                 [--compare-recorded table|topic] [--advance-to T]
                 [--out FILE] [--format jsonl|csv] [--html FILE] [--diff-json FILE]
                 [--diff-csv FILE] [--unsealed] [--progress] [--actor NAME] [--no-audit]
                 [--fail-on-diff]
    vigil replay seal [--patient P ...] [--lag-hours H] [--every SECONDS] [--verify]
    vigil replay config save FILE --by ACTOR [--note TEXT]
    vigil replay config list
    vigil replay config show HASH

Alerts go to ``--out`` (stdout by default) with full evidence; a one-line JSON summary goes to
stderr. Reads ``VIGIL_KAFKA_*`` and ``VIGIL_PG_*``. A replay writes nothing to the live topics
or tables and pages no one; its only write is one ``replay.run`` entry in the audit log.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import asyncpg
from aiokafka.errors import KafkaError

from vigil.runtime import utcnow
from vigil.settings import PostgresSettings
from vigil_tools.replay import config_store, seal
from vigil_tools.replay.engine_port import ConfigError, load_rules_file
from vigil_tools.replay.parallel import WorkerFailed
from vigil_tools.replay.report import (
    PatientPanel,
    ReportContent,
    render_html,
    truncation_warning,
    write_csv,
    write_diff_csv,
    write_jsonl,
)
from vigil_tools.replay.service import ReplayOutcome, ReplayRequest, RulesChoice, run_replay
from vigil_tools.replay.sources import parse_offsets

# How many patients' timelines an HTML report draws; the tables always list every alert.
MAX_PANELS = 50


def _aware(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset (e.g. 2026-01-01T00:00Z)")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return int(text)


def _what_if(text: str) -> tuple[str, Any]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected THRESHOLD=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vigil replay",
        description="Replay a recorded stream through pinned rules (no side effects).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--kafka", action="store_true", help="read the telemetry topic")
    source.add_argument("--archive", action="store_true", help="read the PostgreSQL readings")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--patient", action="append", help="a patient id (repeatable)")
    who.add_argument("--device", action="append", help="a device id (repeatable)")
    who.add_argument("--care-team", help="every patient of a care team")
    who.add_argument("--all", action="store_true", help="every patient")
    p.add_argument("--since", type=_aware, help="archive: device time; kafka: record time")
    p.add_argument("--until", type=_aware, help="exclusive; same clocks as --since")
    p.add_argument("--offsets", type=parse_offsets, help="kafka: PARTITION:START-END,...")
    p.add_argument("--topic", help="kafka: the telemetry topic to read")
    p.add_argument("--alerts-topic", help="the alerts topic for --compare-recorded topic")
    p.add_argument("--state-topic", help="the rules state topic for --config-live")
    p.add_argument("--order", choices=("device", "ingest"), default="device", help="archive")
    warmup = p.add_mutually_exclusive_group()
    warmup.add_argument(
        "--warmup-since",
        type=_aware,
        help="a window that starts mid-stream is preceded by a warm-up that rebuilds the rule "
        "state from the start of the record; start it here instead (faster; exact only if no "
        "rule state of the window reaches back further)",
    )
    warmup.add_argument(
        "--no-warmup",
        action="store_true",
        help="start the window with empty rule state (an open fever or a running interruption "
        "clock before the window is then not known)",
    )
    p.add_argument(
        "--partitions",
        type=int,
        help="archive: partitions of the telemetry topic (default: ask Kafka), so each patient "
        "is replayed on the engine that served it live",
    )
    rules = p.add_mutually_exclusive_group()
    rules.add_argument("--config", help="a RulesConfig JSON file to pin")
    rules.add_argument(
        "--config-version",
        help="a stored config version: its hash, a prefix of it, or the config_version an "
        "alert carries (e.g. pg-3f2a9c81d0e4)",
    )
    rules.add_argument("--config-at", type=_aware, help="the stored config live at that time")
    rules.add_argument(
        "--config-live",
        help="the config the rules service pinned under this config_version (an alert names it)",
    )
    against = p.add_mutually_exclusive_group()
    against.add_argument("--against-config", help="diff against a second config file")
    against.add_argument("--against-version", help="diff against a stored config version")
    against.add_argument(
        "--what-if",
        type=_what_if,
        action="append",
        help="diff against the pinned config with a default threshold changed, e.g. "
        "fever_single_c=38.0 (repeatable)",
    )
    p.add_argument("--compare-recorded", choices=("table", "topic"))
    p.add_argument("--advance-to", type=_aware, help="fire the timers due by this device time")
    p.add_argument(
        "--no-context-time",
        action="store_true",
        help="with a filter: do not read the other patients who shared an engine live (faster; "
        "their event time then no longer moves the timers, which can differ from live)",
    )
    p.add_argument("--out", default="-", help="alerts file ('-' = stdout)")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    p.add_argument("--html", help="write an HTML report here")
    p.add_argument("--diff-json", help="write the comparison(s) as JSON here")
    p.add_argument("--diff-csv", help="write the comparison(s) as CSV here")
    p.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="processes sharing the engine lanes (default: one per core for a long stream)",
    )
    p.add_argument(
        "--unsealed",
        action="store_true",
        help="archive: read every row from the readings tables, not the sealed days (the same "
        "events in the same order; slower)",
    )
    p.add_argument("--progress", action="store_true", default=None, help="force the bar")
    p.add_argument("--actor", default=None, help="who runs the replay (audit log)")
    p.add_argument("--no-audit", action="store_true", help="do not record the run")
    p.add_argument("--fail-on-diff", action="store_true", help="exit 1 when a comparison differs")
    return p


async def _request(args: argparse.Namespace) -> ReplayRequest:
    rules = RulesChoice(
        file=args.config, version=args.config_version, at=args.config_at, live=args.config_live
    )
    candidate: RulesChoice | None = None
    if args.against_config:
        candidate = RulesChoice(file=args.against_config)
    elif args.against_version:
        candidate = RulesChoice(version=args.against_version)
    elif args.what_if:
        candidate = RulesChoice(what_if=tuple(args.what_if))
    request = ReplayRequest(
        source="kafka" if args.kafka else "archive",
        patient_ids=frozenset(args.patient) if args.patient else None,
        device_ids=frozenset(args.device) if args.device else None,
        care_team_id=args.care_team,
        since=args.since,
        until=args.until,
        offsets=tuple(args.offsets or ()),
        order=args.order,
        rules=rules,
        candidate=candidate,
        compare_recorded=args.compare_recorded,
        keep_timelines=bool(args.html),
        audit=not args.no_audit,
        actor=args.actor or getpass.getuser(),
        progress=args.progress,
        advance_to=args.advance_to,
        context_time=not args.no_context_time,
        partitions=args.partitions,
        warmup=not args.no_warmup,
        warmup_since=args.warmup_since,
        workers=args.workers,
        sealed=not args.unsealed,
    )
    if args.topic:
        request = replace(request, topic=args.topic)
    if args.alerts_topic:
        request = replace(request, alerts_topic=args.alerts_topic)
    if args.state_topic:
        request = replace(request, state_topic=args.state_topic)
    return request


def _open(path: str) -> TextIO:
    if path == "-":
        return sys.stdout
    return open(path, "w", encoding="utf-8", newline="")


def write_outputs(outcome: ReplayOutcome, args: argparse.Namespace) -> None:
    # The alerts open when the window started come first, marked as such (decided_by
    # "warmup"), then the window's own decisions.
    items = outcome.primary.open_at_start() + outcome.primary.alerts
    truncated = frozenset(t.partition for t in outcome.truncated)
    out = _open(args.out)
    try:
        if args.format == "csv":
            write_csv(items, out, truncated)
        else:
            write_jsonl(items, out, truncated)
    finally:
        if out is not sys.stdout:
            out.close()
    diffs = [d for d in (outcome.recorded_diff, outcome.candidate_diff) if d is not None]
    if args.diff_json:
        Path(args.diff_json).write_text(
            json.dumps([d.as_dict() for d in diffs], indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
    if args.diff_csv:
        with open(args.diff_csv, "w", encoding="utf-8", newline="") as handle:
            for diff in diffs:
                write_diff_csv(diff, handle)
    if args.html:
        Path(args.html).write_text(render_html(report_content(outcome)), encoding="utf-8")


def report_content(outcome: ReplayOutcome) -> ReportContent:
    """Assemble the HTML report's content from a finished run."""
    primary = outcome.primary
    rules = primary.rules
    panels: list[PatientPanel] = []
    notes: list[str] = []
    patients = sorted(primary.timelines)
    if len(patients) > MAX_PANELS:
        notes.append(
            f"Timelines are drawn for the first {MAX_PANELS} of {len(patients)} patients; "
            "the tables list every alert."
        )
    for patient_id in patients[:MAX_PANELS]:
        mine = [i.alert for i in primary.alerts if i.alert.patient_id == patient_id]
        rows: list[tuple[str, Sequence[Any]]] = []
        if outcome.recorded is not None:
            rows.append(("recorded", [a for a in outcome.recorded if a.patient_id == patient_id]))
            rows.append(("replayed", mine))
        elif outcome.candidate is not None:
            rows.append(("baseline", mine))
            rows.append(
                (
                    "candidate",
                    [i.alert for i in outcome.candidate.alerts if i.alert.patient_id == patient_id],
                )
            )
        else:
            rows.append(("alerts", mine))
        panels.append(
            PatientPanel(
                patient_id=patient_id,
                timeline=primary.timelines[patient_id],
                limits=rules.fever_limits_for(patient_id),
                alert_rows=rows,
            )
        )
    run = dict(outcome.summary())
    run["rules_logic_version"] = rules.logic_version
    run["config_label"] = rules.label
    return ReportContent(
        title="Vigil replay report",
        generated_at=utcnow(),
        run=run,
        alerts=primary.alerts,
        diffs=[d for d in (outcome.recorded_diff, outcome.candidate_diff) if d is not None],
        panels=panels,
        notes=notes,
        warnings=[truncation_warning(t) for t in run["truncated_partitions"]],
    )


async def _replay(argv: list[str]) -> int:
    args = _run_parser().parse_args(argv)
    request = await _request(args)
    outcome = await run_replay(request)
    write_outputs(outcome, args)
    print(json.dumps(outcome.summary()), file=sys.stderr)
    differs = any(
        d is not None and not d.identical for d in (outcome.recorded_diff, outcome.candidate_diff)
    )
    return 1 if args.fail_on_diff and differs else 0


async def _config(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vigil replay config")
    sub = parser.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save", help="store a RulesConfig JSON file as a new version")
    save.add_argument("file")
    save.add_argument("--by", required=True, help="who signs off the change (audit log)")
    save.add_argument("--note")
    sub.add_parser("list", help="every stored version, oldest first")
    show = sub.add_parser("show", help="print a stored version's config JSON")
    show.add_argument("version")
    args = parser.parse_args(argv)
    conn = await asyncpg.connect(PostgresSettings().dsn)
    try:
        if args.command == "save":
            rules = load_rules_file(args.file)
            version, new = await config_store.save_config(
                conn, rules, created_by=args.by, note=args.note
            )
            state = "saved" if new else "already stored"
            print(f"{state}: {version.content_hash} ({version.created_at.isoformat()})")
        elif args.command == "list":
            for version in await config_store.list_versions(conn):
                print(
                    f"{version.content_hash}  {version.created_at.isoformat()}  "
                    f"{version.created_by}  {version.note or ''}"
                )
        else:
            rules = await config_store.load_config(conn, args.version)
            print(json.dumps(rules.content, indent=2, sort_keys=True))
        return 0
    finally:
        await conn.close()


async def _seal(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vigil replay seal",
        description="Seal the readings archive's finished days for fast archive replays, and "
        "seal again the days changed since (stale); with --verify, check every sealed day "
        "against the rows instead (exit 1 when one differs).",
    )
    parser.add_argument("--patient", action="append", help="a patient id (repeatable)")
    parser.add_argument(
        "--lag-hours",
        type=float,
        default=seal.DEFAULT_SEAL_LAG.total_seconds() / 3600,
        help="seal the UTC days that ended at least this long ago (default %(default)s)",
    )
    parser.add_argument("--verify", action="store_true", help="verify, seal nothing")
    parser.add_argument(
        "--every",
        type=float,
        help="seal again every this many seconds, until stopped (a deployment's sealing pass)",
    )
    args = parser.parse_args(argv)
    conn = await asyncpg.connect(PostgresSettings().dsn)
    try:
        if args.verify:
            problems = await seal.verify_seals(conn, args.patient)
            for problem in problems:
                print(problem.describe())
            print(json.dumps({"sealed_day_problems": len(problems)}), file=sys.stderr)
            return 1 if problems else 0
        while True:
            horizon = seal.seal_horizon(utcnow(), timedelta(hours=args.lag_hours))
            stats = await seal.seal_archive(conn, horizon, args.patient)
            print(json.dumps({"sealed_until": horizon.isoformat(), **stats.describe()}), flush=True)
            if not args.every:
                return 0
            await asyncio.sleep(args.every)
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["config"]:
            return asyncio.run(_config(args[1:]))
        if args[:1] == ["seal"]:
            return asyncio.run(_seal(args[1:]))
        return asyncio.run(_replay(args))
    except (ConfigError, LookupError, ValueError) as error:
        print(f"vigil replay: {error}", file=sys.stderr)
        return 2
    except (OSError, asyncpg.PostgresError, KafkaError) as error:
        print(f"vigil replay: cannot reach the stack: {error}", file=sys.stderr)
        return 2
    except seal.SealingUnavailable as error:
        print(f"vigil replay seal: {error}", file=sys.stderr)
        return 2
    except WorkerFailed as error:
        print(f"vigil replay: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
