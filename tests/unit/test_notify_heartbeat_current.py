"""Notify records only heartbeats that still say something about now."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.notify.domain.heartbeat import (
    PipelineVerdict,
    heartbeat_is_current,
    pipeline_verdict,
)

NOW = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)


def test_heartbeat_is_current_up_to_the_timeout_and_stale_past_it() -> None:
    """At exactly the timeout a heartbeat still counts; one microsecond older it does not."""
    assert heartbeat_is_current(device_time=NOW, now=NOW, timeout_s=120)
    assert heartbeat_is_current(device_time=NOW - timedelta(seconds=120), now=NOW, timeout_s=120)
    assert not heartbeat_is_current(
        device_time=NOW - timedelta(seconds=120, microseconds=1), now=NOW, timeout_s=120
    )


def test_a_skipped_heartbeat_is_one_the_verdict_would_call_silent_anyway() -> None:
    """The two edges agree: what is current is healthy when recorded, and what is skipped
    would be silence the moment it was recorded (so skipping it changes no verdict)."""
    for age_s in (0.0, 60.0, 120.0, 120.5, 3600.0):
        seen = NOW - timedelta(seconds=age_s)
        verdict = pipeline_verdict(last_seen_at=seen, silent_since=None, now=NOW, timeout_s=120)
        current = heartbeat_is_current(device_time=seen, now=NOW, timeout_s=120)
        assert current == (verdict is PipelineVerdict.HEALTHY), age_s


def test_naive_times_are_refused() -> None:
    """A naive time cannot be compared with the clock; it is an error, not a guess."""
    with pytest.raises(ValueError):
        heartbeat_is_current(device_time=NOW.replace(tzinfo=None), now=NOW, timeout_s=120)
