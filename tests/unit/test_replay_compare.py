"""Diffing alert decisions: same, timing, changed, missing, extra."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from schemas.events import (
    Alert,
    AlertPhase,
    AlertState,
)
from tests.factories import fever_evidence, make_alert
from vigil_tools.replay.compare import Outcome, diff_alerts

T0 = datetime(2026, 3, 1, 8, tzinfo=UTC)


def alert(
    key: str,
    phase: AlertPhase = AlertPhase.START,
    *,
    at: datetime = T0,
    code: str = "fever_single",
    version: str = "2.0.0+aaaa",
    patient: str = "P-1",
    limit: float = 38.3,
) -> Alert:
    return make_alert(
        patient_id=patient,
        code=code,
        phase=phase,
        at=at + timedelta(seconds=2),
        device_time=at,
        alert_id=uuid.uuid5(uuid.NAMESPACE_URL, f"{key}|{phase}"),
        dedup_key=key,
        device_id="th-1",
        state=AlertState.ACTIVE,
        title="Fever",
        evidence=(fever_evidence(at, unit="Cel", limit=limit),),
        rule_id="fever",
        rule_version=version,
    )


def test_identical_sets_are_all_same() -> None:
    """The recorded set compared with itself is identical, item for item."""
    alerts = [alert("k1"), alert("k1", AlertPhase.END, at=T0 + timedelta(hours=1))]
    report = diff_alerts(alerts, list(alerts))
    assert report.identical
    assert report.counts() == {"same": 2, "timing": 0, "changed": 0, "missing": 0, "extra": 0}


def test_one_missing_one_extra_are_named() -> None:
    """An alert only on the left is missing, one only on the right (another patient) extra."""
    report = diff_alerts([alert("k1")], [alert("k2", patient="P-2")])
    outcomes = {i.outcome: i for i in report.items}
    assert set(outcomes) == {Outcome.MISSING, Outcome.EXTRA}
    missing = outcomes[Outcome.MISSING].left
    assert missing is not None and missing.dedup_key == "k1"
    assert outcomes[Outcome.EXTRA].right is not None
    assert not report.identical


def test_same_key_later_device_time_is_a_timing_difference_with_its_delta() -> None:
    """Same episode phase, decided 10 minutes later on the right: timing, delta +10 min."""
    report = diff_alerts([alert("k1")], [alert("k1", at=T0 + timedelta(minutes=10))])
    (item,) = report.items
    assert item.outcome is Outcome.TIMING
    assert item.matched_by == "key"
    assert item.delta == timedelta(minutes=10)


def test_same_time_different_content_is_changed_and_lists_the_fields() -> None:
    """Same key and time, another code and limit: changed, naming code and evidence."""
    report = diff_alerts([alert("k1")], [alert("k1", code="fever_critical", limit=39.5)])
    (item,) = report.items
    assert item.outcome is Outcome.CHANGED
    assert set(item.differences) == {"code", "evidence"}


def test_rule_version_counts_only_when_asked() -> None:
    """Replayed vs recorded must agree on the version; two configs differ in it by design."""
    left, right = [alert("k1")], [alert("k1", version="2.0.0+bbbb")]
    assert diff_alerts(left, right).items[0].outcome is Outcome.CHANGED
    assert diff_alerts(left, right, compare_rule_version=False).identical


def test_an_episode_that_moved_is_paired_by_patient_rule_and_phase() -> None:
    """A new threshold opens the episode earlier, so its dedup key differs: it is paired with
    the old one as a timing difference, not reported as one missing and one extra."""
    report = diff_alerts(
        [alert("P-1:fever:09:00", at=T0 + timedelta(hours=1))],
        [alert("P-1:fever:08:00", at=T0)],
    )
    (item,) = report.items
    assert item.outcome is Outcome.TIMING
    assert item.matched_by == "episode"
    assert item.delta == -timedelta(hours=1)


def test_episode_pairing_stops_at_the_window() -> None:
    """Two starts a day apart are two different fevers: missing and extra, not a timing."""
    report = diff_alerts(
        [alert("a", at=T0)],
        [alert("b", at=T0 + timedelta(days=1))],
        episode_window=timedelta(hours=6),
    )
    assert sorted(i.outcome.value for i in report.items) == ["extra", "missing"]
