"""Whether the pipeline is alive: the heartbeat must arrive through ingest and rules in time.

Pure: the last time a heartbeat was seen, whether its silence is already being paged, and the
current time go in; the verdict comes out.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum


class PipelineVerdict(StrEnum):
    HEALTHY = "healthy"
    WENT_SILENT = "went_silent"  # page the technical on-call now
    STILL_SILENT = "still_silent"  # already paged; the escalation keeps paging
    RECOVERED = "recovered"  # heartbeats are back: all clear


def pipeline_verdict(
    *,
    last_seen_at: datetime,
    silent_since: datetime | None,
    now: datetime,
    timeout_s: float,
) -> PipelineVerdict:
    if now.tzinfo is None or last_seen_at.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    silent = now - last_seen_at > timedelta(seconds=timeout_s)
    if silent:
        return (
            PipelineVerdict.STILL_SILENT
            if silent_since is not None
            else PipelineVerdict.WENT_SILENT
        )
    return PipelineVerdict.RECOVERED if silent_since is not None else PipelineVerdict.HEALTHY


def heartbeat_is_current(*, device_time: datetime, now: datetime, timeout_s: float) -> bool:
    """Whether a heartbeat arriving ``now`` still says anything about the pipeline's health.

    One older than the timeout would count as silence the moment it is recorded, so it can
    only do harm: replayed from the alerts topic (a new consumer group reads from the start), it
    would bring back long-gone sources and page each of them. A source that is watched already
    loses nothing by skipping it: the verdict on it is the same either way.
    """
    if now.tzinfo is None or device_time.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return now - device_time <= timedelta(seconds=timeout_s)
