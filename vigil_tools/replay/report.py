"""What a replay hands to people: alerts as JSON lines or CSV, diffs, and an HTML report.

The HTML report is one self-contained file an auditor can open anywhere: no scripts, no
external assets; each patient's timeline is hand-written SVG (temperature with the pinned
thresholds, pump state as bands, pump alarms, and each alert marked at its device time, with
hover text from SVG ``<title>`` elements). Pure formatting: callers pass in everything, including
the time the report says it was generated.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from html import escape
from typing import Any, TextIO

from schemas.events import Alert
from vigil_tools.replay.compare import AlertDiffReport, Outcome
from vigil_tools.replay.engine_port import PinnedRules
from vigil_tools.replay.runner import ReplayedAlert, Timeline


def describe_position(position: tuple[str, Any, int]) -> str:
    source, where, number = position
    if source == "kafka":
        return f"kafka partition {where} offset {number}"
    if source == "pg":
        return f"archive {where}, message {number}"
    if source == "end":
        return f"end of stream (timers due by --advance-to, after {number} events)"
    if source in ("warmup", "warmup-context"):
        return f"open at window start (decided before it: {where} #{number})"
    return f"{source} event {number}"


def evidence_text(alert: Alert) -> str:
    return "; ".join(
        f"{e.name} {e.value:g} {e.unit} {e.comparator} {e.limit:g} at {e.device_time.isoformat()}"
        + (f" (message {e.message_id})" if e.message_id else "")
        for e in alert.evidence
    )


def under_truncated_warmup(item: ReplayedAlert, truncated: frozenset[int]) -> bool:
    """Whether a replayed alert may differ from live because its partition's warm-up was cut
    short by retention: its own partition is among ``truncated``; an alert of the stream's end
    (``--advance-to``), whose partition the position does not name, whenever any is."""
    if not truncated:
        return False
    partition = PinnedRules.lane_of(item.position)
    return partition in truncated if partition is not None else True


def alert_record(item: ReplayedAlert, truncated: frozenset[int] = frozenset()) -> dict[str, Any]:
    """The JSON form of one replayed alert: the alert exactly as rules would publish it, plus
    where in the record its deciding event is, which config decided it, and whether a
    truncated warm-up (``truncated``: the partitions whose retained log began too late) puts
    it in doubt."""
    source, where, number = item.position
    return {
        "alert": item.alert.model_dump(mode="json", by_alias=True),
        "decided_by": {
            "source": source,
            "where": where,
            "number": number,
            "description": describe_position(item.position),
        },
        "config_hash": item.config_hash,
        "warmup_truncated": under_truncated_warmup(item, truncated),
    }


def write_jsonl(
    items: Iterable[ReplayedAlert], out: TextIO, truncated: frozenset[int] = frozenset()
) -> int:
    count = 0
    for item in items:
        out.write(json.dumps(alert_record(item, truncated), ensure_ascii=False) + "\n")
        count += 1
    return count


CSV_COLUMNS = (
    "alert_id",
    "dedup_key",
    "patient_id",
    "device_id",
    "rule_id",
    "rule_version",
    "code",
    "priority",
    "phase",
    "state",
    "device_time",
    "ingest_time",
    "title",
    "evidence",
    "decided_by",
    "config_hash",
    "warmup_truncated",
)


def write_csv(
    items: Iterable[ReplayedAlert], out: TextIO, truncated: frozenset[int] = frozenset()
) -> int:
    """One row per alert; ``warmup_truncated`` says, row by row, what the summary says of
    the run (see ``under_truncated_warmup``)."""
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    count = 0
    for item in items:
        a = item.alert
        writer.writerow(
            (
                a.alert_id,
                a.dedup_key,
                a.patient_id,
                a.device_id,
                a.rule_id,
                a.rule_version,
                a.code,
                a.priority.value,
                a.phase.value,
                a.state.value,
                a.device_time.isoformat(),
                a.ingest_time.isoformat(),
                a.title,
                evidence_text(a),
                describe_position(item.position),
                item.config_hash,
                "true" if under_truncated_warmup(item, truncated) else "false",
            )
        )
        count += 1
    return count


DIFF_COLUMNS = (
    "outcome",
    "matched_by",
    "patient_id",
    "rule_id",
    "phase",
    "left_code",
    "right_code",
    "left_device_time",
    "right_device_time",
    "delta_s",
    "left_dedup_key",
    "right_dedup_key",
    "left_rule_version",
    "right_rule_version",
    "differences",
)


def write_diff_csv(report: AlertDiffReport, out: TextIO) -> None:
    writer = csv.writer(out)
    writer.writerow(DIFF_COLUMNS)
    for item in report.items:
        row = item.as_dict()
        row["differences"] = " ".join(row["differences"])
        writer.writerow(tuple(row[c] for c in DIFF_COLUMNS))


# ---------------------------------------------------------------------------------------------
# HTML


@dataclass(frozen=True, slots=True)
class PatientPanel:
    """Everything one patient's section of the report shows."""

    patient_id: str
    timeline: Timeline
    limits: Mapping[str, float]
    # (label, alerts) rows of markers: one row for a plain replay, two for a comparison.
    alert_rows: Sequence[tuple[str, Sequence[Alert]]]


@dataclass(frozen=True, slots=True)
class ReportContent:
    title: str
    generated_at: datetime
    run: Mapping[str, Any]
    alerts: Sequence[ReplayedAlert]
    diffs: Sequence[AlertDiffReport] = ()
    panels: Sequence[PatientPanel] = ()
    notes: Sequence[str] = field(default_factory=tuple)
    # What makes the run's result less than exact (a truncated warm-up): shown first, in red.
    warnings: Sequence[str] = field(default_factory=tuple)


_PHASE_COLOURS = {
    "start": "#c0392b",
    "continue": "#e67e22",
    "escalate": "#7b1010",
    "de-escalate": "#d68910",
    "end": "#1e8449",
}
_PUMP_COLOURS = {
    "running": "#d5efd5",
    "paused": "#fdeaa7",
    "stopped": "#f3b3b3",
    "alarming": "#e06666",
}
_LIMIT_STYLE = {
    "critical_c": ("#7b1010", "critical"),
    "single_c": ("#c0392b", "single"),
    "sustained_c": ("#e67e22", "sustained"),
    "clear_c": ("#1e8449", "clear"),
}

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0;font-size:12.5px}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f2f2f2}.k{color:#555}.same{background:#eef8ee}.missing{background:#fbe3e3}
.extra{background:#fdf0d5}.timing,.changed{background:#e8eefa}code{font-size:12px}
.warn{border:2px solid #c0392b;background:#fbe3e3;padding:6px 10px}
.legend span{display:inline-block;margin-right:14px}.sw{display:inline-block;width:12px;
height:12px;margin-right:4px;vertical-align:middle;border:1px solid #999}
"""


def _fmt_time(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def downsample(
    points: Sequence[tuple[datetime, float]], limit: int
) -> list[tuple[datetime, float]]:
    """Keep the shape (each bucket's min and max) so a peak never disappears from the plot."""
    if len(points) <= limit:
        return list(points)
    size = max(1, (2 * len(points)) // limit)
    kept: list[tuple[datetime, float]] = []
    for start in range(0, len(points), size):
        bucket = points[start : start + size]
        low = min(bucket, key=lambda p: p[1])
        high = max(bucket, key=lambda p: p[1])
        kept.extend(sorted({low, high}, key=lambda p: p[0]))
    return kept


def timeline_svg(panel: PatientPanel, *, width: int = 1100) -> str:
    """One patient's timeline as an SVG element (no scripts; hover text via <title>)."""
    timeline = panel.timeline
    times = [t for t, _ in timeline.temperatures] + [t for t, _ in timeline.pump_states]
    times += [t for t, _, _ in timeline.pump_events]
    for _, alerts in panel.alert_rows:
        times += [a.device_time for a in alerts]
    if not times:
        return "<p class='k'>No events for this patient.</p>"
    t0, t1 = min(times), max(times)
    if t1 <= t0:
        t1 = t0 + timedelta(hours=1)
    left, right, top = 56, 16, 14
    marker_rows = len(panel.alert_rows)
    plot_top = top + 16 * marker_rows
    plot_h = 190
    band_y = plot_top + plot_h + 8
    band_h = 16
    axis_y = band_y + band_h + 4
    height = axis_y + 22
    plot_w = width - left - right
    span = (t1 - t0).total_seconds()
    temps = [v for _, v in timeline.temperatures]
    limits = dict(panel.limits)
    shown_limits = {k: limits[k] for k in _LIMIT_STYLE if k in limits}
    y_low = min([35.5, *temps])
    y_high = max([40.5, *temps, *shown_limits.values()])

    def x(moment: datetime) -> float:
        return left + plot_w * (moment - t0).total_seconds() / span

    def y(value: float) -> float:
        return plot_top + plot_h * (y_high - value) / (y_high - y_low)

    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' role='img' "
        f"aria-label='timeline of {escape(panel.patient_id)}'>",
        f"<rect x='{left}' y='{plot_top}' width='{plot_w}' height='{plot_h}' fill='#fcfcfc' "
        "stroke='#bbb'/>",
    ]
    # Temperature grid and labels, every half degree.
    value = float(int(y_low * 2)) / 2
    while value <= y_high:
        if value >= y_low:
            parts.append(
                f"<line x1='{left}' x2='{left + plot_w}' y1='{y(value):.1f}' y2='{y(value):.1f}' "
                "stroke='#eee'/>"
                f"<text x='{left - 6}' y='{y(value) + 4:.1f}' font-size='10' text-anchor='end'>"
                f"{value:.1f}</text>"
            )
        value += 0.5
    for key, limit in shown_limits.items():
        colour, name = _LIMIT_STYLE[key]
        parts.append(
            f"<line x1='{left}' x2='{left + plot_w}' y1='{y(limit):.1f}' y2='{y(limit):.1f}' "
            f"stroke='{colour}' stroke-dasharray='5,4'><title>{name} threshold {limit:g} °C"
            f"</title></line>"
            f"<text x='{left + plot_w - 4}' y='{y(limit) - 3:.1f}' font-size='10' "
            f"text-anchor='end' fill='{colour}'>{name} {limit:g}</text>"
        )
    # Pump state bands: each status holds until the next one.
    states = timeline.pump_states
    for index, (moment, state) in enumerate(states):
        end = states[index + 1][0] if index + 1 < len(states) else t1
        x0, x1 = x(moment), max(x(end), x(moment) + 1)
        parts.append(
            f"<rect x='{x0:.1f}' y='{band_y}' width='{x1 - x0:.1f}' height='{band_h}' "
            f"fill='{_PUMP_COLOURS.get(state, '#ddd')}'><title>pump {escape(state)} from "
            f"{_fmt_time(moment)}</title></rect>"
        )
    parts.append(
        f"<rect x='{left}' y='{band_y}' width='{plot_w}' height='{band_h}' fill='none' "
        "stroke='#bbb'/>"
        f"<text x='{left - 6}' y='{band_y + 12}' font-size='10' text-anchor='end'>pump</text>"
    )
    for moment, event, alarm in timeline.pump_events:
        label = f"{event} {alarm}" if alarm else event
        colour = "#7b1010" if event == "alarm_raised" else "#555"
        px = x(moment)
        parts.append(
            f"<path d='M{px:.1f},{band_y - 1} l-4,-7 h8 z' fill='{colour}'><title>"
            f"{escape(label)} at {_fmt_time(moment)}</title></path>"
        )
    # Temperature trace.
    points = downsample(timeline.temperatures, 2 * plot_w)
    if points:
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
        parts.append(f"<polyline points='{path}' fill='none' stroke='#2c5aa0' stroke-width='1.2'/>")
        if len(points) <= 400:
            parts.extend(
                f"<circle cx='{x(t):.1f}' cy='{y(v):.1f}' r='1.8' fill='#2c5aa0'><title>"
                f"{v:.2f} °C at {_fmt_time(t)}</title></circle>"
                for t, v in points
            )
    # Alert markers: one row per side, a line down through the plot at device time.
    for row, (label, alerts) in enumerate(panel.alert_rows):
        row_y = top + 16 * row + 6
        parts.append(
            f"<text x='{left - 6}' y='{row_y + 4}' font-size='10' text-anchor='end'>"
            f"{escape(label)}</text>"
        )
        for alert in alerts:
            colour = _PHASE_COLOURS.get(alert.phase.value, "#333")
            ax = x(alert.device_time)
            # The second row (the candidate or the replay) is dashed, so overlaps stay visible.
            dash = " stroke-dasharray='2,2'" if row else ""
            tip = escape(
                f"{label}: {alert.phase.value} {alert.code} at {_fmt_time(alert.device_time)} "
                f"({alert.rule_version}) — {evidence_text(alert)}"
            )
            parts.append(
                f"<g><title>{tip}</title>"
                f"<line x1='{ax:.1f}' x2='{ax:.1f}' y1='{row_y}' y2='{plot_top + plot_h}' "
                f"stroke='{colour}' stroke-width='1' stroke-opacity='0.6'"
                f"{dash}/>"
                f"<circle cx='{ax:.1f}' cy='{row_y}' r='5' fill='{colour}'/></g>"
            )
    # Time axis: ticks at whole days for long spans, whole hours otherwise.
    step = timedelta(days=1) if span > 2 * 86400 else timedelta(hours=3 if span > 12 * 3600 else 1)
    if span > 14 * 86400:
        step = timedelta(days=2)
    tick = t0.replace(minute=0, second=0, microsecond=0)
    if step >= timedelta(days=1):
        tick = tick.replace(hour=0)
    while tick <= t1:
        if tick >= t0:
            tx = x(tick)
            text = tick.strftime("%m-%d") if step >= timedelta(days=1) else tick.strftime("%H:%M")
            parts.append(
                f"<line x1='{tx:.1f}' x2='{tx:.1f}' y1='{axis_y - 3}' y2='{axis_y + 2}' "
                f"stroke='#666'/><text x='{tx:.1f}' y='{axis_y + 14}' font-size='10' "
                f"text-anchor='middle'>{text}</text>"
            )
        tick += step
    parts.append("</svg>")
    return "".join(parts)


def _legend() -> str:
    items = [
        f"<span><i class='sw' style='background:{c}'></i>alert {p}</span>"
        for p, c in _PHASE_COLOURS.items()
        if p in ("start", "escalate", "end")
    ]
    items += [
        f"<span><i class='sw' style='background:{c}'></i>pump {s}</span>"
        for s, c in _PUMP_COLOURS.items()
    ]
    return "<p class='legend'>" + "".join(items) + "</p>"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], row_class: Any = None) -> str:
    out = io.StringIO()
    out.write("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr>")
    for index, row in enumerate(rows):
        css = f" class='{row_class(index)}'" if row_class else ""
        out.write(f"<tr{css}>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>")
    out.write("</table>")
    return out.getvalue()


def render_html(content: ReportContent) -> str:
    body = io.StringIO()
    body.write(f"<h1>{escape(content.title)}</h1>")
    body.write(
        "<p class='k'>Generated "
        + escape(_fmt_time(content.generated_at))
        + ". All times are device times unless marked otherwise.</p>"
    )
    for warning in content.warnings:
        body.write(f"<p class='warn'><b>Warning:</b> {escape(warning)}</p>")
    body.write("<h2>Run</h2>")
    body.write(
        _table(
            ("field", "value"),
            (
                (k, v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
                for k, v in content.run.items()
            ),
        )
    )
    for note in content.notes:
        body.write(f"<p class='k'>{escape(note)}</p>")
    for diff in content.diffs:
        counts = diff.counts()
        body.write(
            f"<h2>Comparison: {escape(diff.left_label)} → {escape(diff.right_label)}</h2>"
            "<p>"
            + ", ".join(f"{escape(k)}: <b>{v}</b>" for k, v in counts.items())
            + (" — <b>identical</b>" if diff.identical else "")
            + "</p>"
        )
        items = [item.as_dict() for item in diff.items]
        classes = [i["outcome"] for i in items]
        body.write(
            _table(
                (
                    "outcome",
                    "patient",
                    "phase",
                    f"{diff.left_label} code",
                    f"{diff.left_label} time",
                    f"{diff.right_label} code",
                    f"{diff.right_label} time",
                    "Δ (min)",
                    "differences",
                ),
                (
                    (
                        i["outcome"],
                        i["patient_id"],
                        i["phase"],
                        i["left_code"] or "—",
                        i["left_device_time"] or "—",
                        i["right_code"] or "—",
                        i["right_device_time"] or "—",
                        f"{i['delta_s'] / 60:+.0f}" if i["delta_s"] is not None else "",
                        " ".join(i["differences"]),
                    )
                    for i in items
                ),
                row_class=classes.__getitem__,
            )
        )
    body.write(f"<h2>Alerts decided in replay ({len(content.alerts)})</h2>")
    body.write(
        _table(
            (
                "device time",
                "patient",
                "phase",
                "code",
                "priority",
                "rule version",
                "evidence",
                "decided by",
            ),
            (
                (
                    _fmt_time(i.alert.device_time),
                    i.alert.patient_id,
                    i.alert.phase.value,
                    i.alert.code,
                    i.alert.priority.value,
                    i.alert.rule_version,
                    evidence_text(i.alert),
                    describe_position(i.position),
                )
                for i in content.alerts
            ),
        )
    )
    if content.panels:
        body.write("<h2>Timelines</h2>" + _legend())
    for panel in content.panels:
        limits = ", ".join(f"{k} {v:g}" for k, v in sorted(panel.limits.items()))
        body.write(
            f"<h3>{escape(panel.patient_id)}</h3><p class='k'>thresholds: {escape(limits)}</p>"
        )
        body.write(timeline_svg(panel))
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(content.title)}</title><style>{_CSS}</style></head><body>"
        + body.getvalue()
        + "</body></html>\n"
    )


def truncation_warning(partition: Mapping[str, Any]) -> str:
    """The report's sentence for one partition of ``truncated_partitions`` in the summary."""
    needed = partition["needed_from"]
    return (
        f"warm-up truncated: Kafka partition {partition['partition']} now begins at offset "
        f"{partition['earliest_offset']} (record time {partition['earliest_time'] or 'unknown'});"
        f" the warm-up needed it from {needed}. Retention has deleted the records before it, so"
        " the engine started there with an empty state: decisions near the window start may"
        " differ from the live ones."
    )


def outcome_counts(diff: AlertDiffReport) -> dict[str, int]:
    return {outcome.value: diff.counts()[outcome.value] for outcome in Outcome}
