"""The night the care-team API's morning summary tells of (``night_to_summarise`` in
services/api/service_layer/cover.py), from an agreement's versions: the latest window ended,
or the one a revocation cut short, which then ends at the revocation, is answered from it and
names it; the same window notify's ``nights_to_tell`` e-mails."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from services.api.service_layer.cover import Version, night_to_summarise
from services.notify.public import CoverHours, NightToTell, Revocation, nights_to_tell

PARIS = ZoneInfo("Europe/Paris")
NIGHTS = CoverHours("Europe/Paris", frozenset(range(7)), time(20), time(8))
AGREEMENT = uuid.UUID("6d1c1f4e-0000-4000-8000-000000000001")
STARTS = datetime(2026, 12, 7, 20, tzinfo=PARIS)  # the night in question, 20:00-08:00
ENDS = datetime(2026, 12, 8, 8, tzinfo=PARIS)
NIGHT_BEFORE = NightToTell(STARTS - timedelta(days=1), ENDS - timedelta(days=1))
SIGNED = datetime(2026, 12, 1, 9, tzinfo=UTC)

V1 = Version(
    agreement_id=AGREEMENT,
    version=1,
    covering_team_id="big",
    covered_team_id="small",
    hours=NIGHTS,
    proposed_by="big-nurse",
    proposed_side="big",
    proposed_at=SIGNED - timedelta(hours=1),
    decision="approved",
    decided_by="small-nurse",
    decided_at=SIGNED,
)


def revoked(current: Version, at: datetime, reason: str | None = "staffed tonight") -> Version:
    """The revocation as the API appends it: the current terms, revoked, in force at once."""
    return replace(
        current,
        version=current.version + 1,
        revoked=True,
        reason=reason,
        proposed_by="small-nurse",
        proposed_side="small",
        proposed_at=at,
        decided_by="small-nurse",
        decided_at=at,
    )


def test_a_full_window_is_told_once_it_has_ended() -> None:
    assert night_to_summarise([V1], ENDS - timedelta(seconds=1)) == (V1, NIGHT_BEFORE)
    assert night_to_summarise([V1], ENDS) == (V1, NightToTell(STARTS, ENDS))
    assert night_to_summarise([V1], ENDS + timedelta(hours=10)) == (V1, NightToTell(STARTS, ENDS))
    # No agreement, or none signed off before a window ended: nothing.
    assert night_to_summarise([], ENDS) is None
    assert night_to_summarise([V1], SIGNED) is None


def test_a_revocation_mid_window_ends_the_night_there_from_the_revocation_on() -> None:
    at = datetime(2026, 12, 8, 3, tzinfo=PARIS)
    versions = [V1, revoked(V1, at)]
    told = Revocation(at, "small-nurse", "small", "staffed tonight")
    cut = NightToTell(STARTS, at, told)
    # Just before it the night is in progress: the night before is the latest (the control).
    assert night_to_summarise(versions, at - timedelta(seconds=1)) == (V1, NIGHT_BEFORE)
    assert night_to_summarise(versions, at) == (V1, cut)
    # Past the window's own end, days later: still the night to the revocation, never to 08:00.
    for later in (ENDS + timedelta(hours=1), at + timedelta(days=3)):
        assert night_to_summarise(versions, later) == (V1, cut)
    assert night_to_summarise(versions, at + timedelta(days=8, seconds=1)) is None
    # The window notify e-mails at the same moment is this one.
    assert nights_to_tell(NIGHTS, SIGNED, at, at - timedelta(days=1), told)[-1] == cut


def test_a_revocation_at_a_windows_start_or_outside_one_cuts_nothing_short() -> None:
    at_start = [V1, revoked(V1, STARTS, None)]
    assert night_to_summarise(at_start, STARTS + timedelta(hours=2)) == (V1, NIGHT_BEFORE)
    assert night_to_summarise(at_start, ENDS + timedelta(hours=2)) == (V1, NIGHT_BEFORE)
    by_day = ENDS + timedelta(hours=2)
    outside = [V1, revoked(V1, by_day)]
    assert night_to_summarise(outside, by_day + timedelta(hours=1)) == (
        V1,
        NightToTell(STARTS, ENDS),
    )
    # The next night was not covered: the last one covered is still the one told of.
    assert night_to_summarise(outside, ENDS + timedelta(days=1, hours=1)) == (
        V1,
        NightToTell(STARTS, ENDS),
    )


def test_a_revocation_cuts_short_the_version_in_force_not_an_older_one() -> None:
    """Version 2 (from 22:00) is signed off during the night's window and counts for it; the
    revocation at 03:00 cuts version 2's window short, and version 1 tells nothing of it."""
    v2 = replace(
        V1,
        version=2,
        hours=replace(NIGHTS, starts=time(22)),
        proposed_side="small",
        proposed_by="small-nurse",
        decided_by="big-nurse",
        decided_at=datetime(2026, 12, 7, 21, tzinfo=PARIS),
    )
    at = datetime(2026, 12, 8, 3, tzinfo=PARIS)
    versions = [V1, v2, revoked(v2, at, None)]
    assert night_to_summarise(versions, at - timedelta(minutes=1)) == (V1, NIGHT_BEFORE)
    assert night_to_summarise(versions, ENDS) == (
        v2,
        NightToTell(
            datetime(2026, 12, 7, 22, tzinfo=PARIS),
            at,
            Revocation(at, "small-nurse", "small", None),
        ),
    )
    # Not revoked, version 2 tells the whole night from its own start.
    assert night_to_summarise([V1, v2], ENDS) == (
        v2,
        NightToTell(datetime(2026, 12, 7, 22, tzinfo=PARIS), ENDS),
    )
