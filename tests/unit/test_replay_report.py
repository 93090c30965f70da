"""What a replay hands to people: JSON lines, CSV, and a self-contained HTML report."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta
from xml.etree import ElementTree

from schemas.events import Alert
from vigil_tools.replay.compare import diff_alerts
from vigil_tools.replay.engine_port import default_rules, from_telemetry, with_overrides
from vigil_tools.replay.progress import ProgressBar
from vigil_tools.replay.report import (
    CSV_COLUMNS,
    PatientPanel,
    ReportContent,
    downsample,
    render_html,
    timeline_svg,
    under_truncated_warmup,
    write_csv,
    write_jsonl,
)
from vigil_tools.replay.runner import Replay, ReplayedAlert
from vigil_tools.replay.synthetic import FeverEpisode, PumpPause, course

START = datetime(2026, 3, 1, tzinfo=UTC)


def replayed(patient: str = "P-1", days: float = 2) -> Replay:
    events = course(
        patient,
        START,
        thermometer_id="th-1",
        pump_id="pu-1",
        days=days,
        fevers=(FeverEpisode(timedelta(hours=20), timedelta(minutes=30), 38.7),),
        pauses=(PumpPause(timedelta(hours=30), timedelta(minutes=45)),),
    )
    replay = Replay(default_rules(), keep_timelines=True)
    replay.feed([(from_telemetry(e), ("kafka", 0, n)) for n, e in enumerate(events)])
    replay.finish()
    return replay


def test_jsonl_carries_each_alert_exactly_with_where_it_was_decided() -> None:
    """Every line parses back to the very alert the engine decided, plus its position."""
    replay = replayed()
    out = io.StringIO()
    assert write_jsonl(replay.alerts, out) == len(replay.alerts) > 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    for line, item in zip(lines, replay.alerts, strict=True):
        assert Alert.model_validate(line["alert"]) == item.alert
        assert line["decided_by"]["source"] == "kafka"
        assert line["decided_by"]["number"] == item.position[2]
        assert line["config_hash"] == default_rules().content_hash


def test_csv_has_one_row_per_alert_with_readable_evidence() -> None:
    """The CSV header is stable and the fever row shows value, comparator and limit."""
    replay = replayed()
    out = io.StringIO()
    write_csv(replay.alerts, out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == len(replay.alerts)
    fever = next(r for r in rows if r["code"] == "fever_single")
    assert "38.7 Cel >= 38.3" in fever["evidence"]


def test_html_report_is_self_contained_and_marks_every_alert() -> None:
    """No scripts and no external references; the timeline draws the temperature, the pump
    bands, the threshold lines and one marker per alert."""
    replay = replayed()
    baseline = [i.alert for i in replay.alerts]
    candidate_rules = with_overrides(default_rules(), {"fever_single_c": 38.0})
    panel = PatientPanel(
        patient_id="P-1",
        timeline=replay.timelines["P-1"],
        limits=default_rules().fever_limits_for("P-1"),
        alert_rows=[("alerts", baseline)],
    )
    html = render_html(
        ReportContent(
            title="replay",
            generated_at=START,
            run={"source": "kafka"},
            alerts=replay.alerts,
            diffs=[diff_alerts(baseline, baseline, left_label="recorded")],
            panels=[panel],
        )
    )
    assert "<script" not in html.lower()
    assert not re.search(r"(src|href)=['\"]?https?:", html)
    assert html.count("<svg") == 1
    assert "<polyline" in html
    assert "pump paused" in html
    assert "single 38.3" in html
    svg = timeline_svg(panel)
    assert ElementTree.fromstring(svg).tag == "{http://www.w3.org/2000/svg}svg"  # well-formed
    assert svg.count("<circle cx=") - svg.count("°C at") == len(baseline)
    assert candidate_rules.fever_limits_for("P-1")["single_c"] == 38.0


def test_html_escapes_what_comes_from_the_record() -> None:
    """A patient id with markup in it is shown, not interpreted."""
    replay = replayed(patient="<b>x</b>", days=0.5)
    panel = PatientPanel(
        patient_id="<b>x</b>",
        timeline=replay.timelines["<b>x</b>"],
        limits={"single_c": 38.3},
        alert_rows=[("alerts", [])],
    )
    html = render_html(
        ReportContent(title="t", generated_at=START, run={}, alerts=[], panels=[panel])
    )
    assert "<b>x</b>" not in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html


def test_long_timelines_aredownsampled_without_losing_the_peak() -> None:
    """A 28-day course draws at most a few thousand points, and the fever peak is among them."""
    replay = replayed(days=28)
    panel = PatientPanel("P-1", replay.timelines["P-1"], {"single_c": 38.3}, [("alerts", [])])
    svg = timeline_svg(panel, width=1100)
    points = re.search(r"<polyline points='([^']*)'", svg)
    assert points is not None
    count = len(points.group(1).split())
    assert count < len(replay.timelines["P-1"].temperatures) / 2
    assert "°C at" not in svg  # per-point hover circles only on short timelines
    kept = downsample(replay.timelines["P-1"].temperatures, 2000)
    assert len(kept) <= 2100
    assert max(v for _, v in kept) == 38.7
    assert min(v for _, v in kept) == min(v for _, v in replay.timelines["P-1"].temperatures)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_only_for_a_terminal_or_when_asked() -> None:
    """Off on a pipe by default, on for a terminal or with --progress; it shows the percent."""
    quiet = io.StringIO()
    bar = ProgressBar(100, stream=quiet)
    bar.advance(50)
    bar.close()
    assert quiet.getvalue() == ""

    tty = _Tty()
    bar = ProgressBar(200, stream=tty)
    bar.advance(50)
    bar.close()
    assert " 25.0%" in tty.getvalue() and "50/200" in tty.getvalue()

    forced = io.StringIO()
    bar = ProgressBar(None, stream=forced, enabled=True)
    bar.advance(7)
    bar.close()
    assert "7 events" in forced.getvalue()


def test_alert_files_flag_the_alerts_of_a_partition_whose_warm_up_was_truncated() -> None:
    """With partition 0 truncated, every alert decided on it says so in JSONL and CSV; with
    another partition truncated, none does; an alert of the stream's end (no partition named)
    does whenever any partition is."""
    replay = replayed()  # every alert decided on partition 0
    for truncated, expected in ((frozenset({0}), True), (frozenset({3}), False)):
        out = io.StringIO()
        write_jsonl(replay.alerts, out, truncated)
        assert {json.loads(x)["warmup_truncated"] for x in out.getvalue().splitlines()} == {
            expected
        }
        out = io.StringIO()
        write_csv(replay.alerts, out, truncated)
        rows = list(csv.DictReader(io.StringIO(out.getvalue())))
        assert {r["warmup_truncated"] for r in rows} == {"true" if expected else "false"}
    out = io.StringIO()
    write_jsonl(replay.alerts, out)
    assert not any(json.loads(x)["warmup_truncated"] for x in out.getvalue().splitlines())
    end = ReplayedAlert(replay.alerts[0].alert, ("end", None, 10), "h")
    assert under_truncated_warmup(end, frozenset({3}))
    assert not under_truncated_warmup(end, frozenset())
