"""A warm-up that cannot reach back far enough is flagged, never hidden.

``truncated_starts`` decides, per Kafka partition, whether the replay had to start reading at
a log beginning that retention (or ``delete_records``) has moved; the report turns each flag
into a warning an auditor sees first.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from vigil_tools.replay.report import ReportContent, render_html, truncation_warning
from vigil_tools.replay.sources import TruncatedStart, truncated_starts

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def test_a_log_that_was_never_trimmed_is_not_flagged() -> None:
    """Offset 0 is the first record ever written: reading from it misses nothing."""
    assert truncated_starts({0: 0, 1: 0}, {0: 0, 1: 0}, {}, None) == []


def test_a_warmup_from_a_trimmed_beginning_is_flagged_with_its_offset_and_time() -> None:
    """A partition whose earliest offset is above 0 and is where the warm-up starts lost its
    history; the flag names the partition, the earliest offset and its record time."""
    found = truncated_starts({0: 0, 3: 120}, {0: 0, 3: 120}, {3: T0}, None)
    assert found == [TruncatedStart(3, 120, T0, None)]
    assert found[0].describe() == {
        "partition": 3,
        "earliest_offset": 120,
        "earliest_time": T0.isoformat(),
        "needed_from": "start of record",
    }


def test_a_warmup_since_covered_by_the_retained_log_is_not_flagged() -> None:
    """With ``--warmup-since``, a trimmed log is fine when its earliest record is no later
    than the time the warm-up needed (the edge: exactly at it)."""
    assert truncated_starts({2: 50}, {2: 50}, {2: T0}, T0) == []
    assert truncated_starts({2: 50}, {2: 50}, {2: T0}, T0 + timedelta(hours=1)) == []


def test_a_warmup_since_earlier_than_the_retained_log_is_flagged() -> None:
    """One millisecond too late is already a truncation: the warm-up wanted records that are
    gone."""
    needed = T0 - timedelta(milliseconds=1)
    assert truncated_starts({2: 50}, {2: 50}, {2: T0}, needed) == [
        TruncatedStart(2, 50, T0, needed)
    ]


def test_reading_from_after_the_beginning_is_not_flagged() -> None:
    """A warm-up that starts past the earliest offset (``--warmup-since`` found a later
    record) did not need what retention deleted."""
    assert truncated_starts({1: 400}, {1: 120}, {1: T0}, None) == []


def test_the_html_report_shows_the_truncation_before_the_run_table() -> None:
    """The warning is in the report, above everything else, with partition and offset."""
    flag = TruncatedStart(4, 77, T0, None).describe()
    html = render_html(
        ReportContent(
            title="t",
            generated_at=T0,
            run={"warmup_truncated": True, "truncated_partitions": [flag]},
            alerts=[],
            warnings=[truncation_warning(flag)],
        )
    )
    assert "class='warn'" in html
    assert html.index("warm-up truncated: Kafka partition 4 now begins at offset 77") < (
        html.index("<h2>Run</h2>")
    )
