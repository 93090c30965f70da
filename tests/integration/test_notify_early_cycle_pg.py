# ruff: noqa: F811 - the escalation tests' fixtures are imported by name
"""The early-cycle escalation through notify and PostgreSQL: a care team's override set through
notify's service layer (validated, audited), read when a fever in the CRS window opens, frozen on
the escalation and run by the ticker; a real SMTP server receives the pages. The fixtures are
the escalation tests' (``test_notify_escalation``): one notify instance with an injected clock
per test, its own care team, people and patient. (The care-team API's route for the override:
tests/api/test_api_oncall.)"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.events import Alert, Evidence
from schemas.notify import EarlyCycleEscalationIn
from tests.integration.test_notify_escalation import (  # noqa: F401 - fixtures
    Rig,
    _alert,
    _email_people,
    _mail,
    _team,
    _three_step_policy,
    pagerduty,
    pool,
    rig,
)

pytestmark = pytest.mark.stack


def _day(alert: Alert, day: int, limit: int = 3) -> Alert:
    """``alert`` as the rules decide it in the CRS window: with its ``cycle_day`` evidence."""
    return alert.model_copy(
        update={
            "title": f"{alert.title} (cycle day {day}: first days of the cycle)",
            "evidence": (
                *alert.evidence,
                Evidence(
                    name="cycle_day",
                    value=day,
                    unit="d",
                    limit=limit,
                    comparator="<=",
                    device_time=alert.device_time,
                ),
            ),
        }
    )


def _people(tag: str) -> dict[str, list[dict[str, str]]]:
    return {
        **_email_people(tag),
        "physician": [{"channel": "email", "address": f"physician-{tag}@h.test"}],
    }


async def _early_team(rig: Rig, *, override: bool = True) -> tuple[str, str]:
    """Primary, 5 min, secondary, 5 min, attending; on early-cycle fevers a 2 min wait and the
    on-call physician paged at once (when ``override``)."""
    team, patient = await _team(rig, people=_people(rig.tag), steps=_three_step_policy(rig.tag))
    if override:
        assert await rig.desk.early_cycle(
            team,
            {
                "ack_wait_minutes": 2,
                "extra_targets": [{"kind": "person", "ref": f"physician-{rig.tag}"}],
                "changed_by": "person:lead-nurse",
            },
        )
    return team, patient


async def _step(rig: Rig, **delta: float) -> None:
    rig.clock.advance(**delta)
    await rig.service.tick()
    await rig.service.deliver_due()


def _body(raw: bytes) -> str:
    return _mail(raw).get_payload(decode=True).decode()  # type: ignore[union-attr]


async def test_day_two_fever_pages_the_physician_at_once_and_repages_after_two_minutes(
    rig: Rig,
) -> None:
    await _early_team(rig)
    alert = _day(_alert(f"P-{rig.tag}"), 2)
    assert await rig.service.handle_alert(alert)

    primary, physician = f"primary-{rig.tag}@h.test", f"physician-{rig.tag}@h.test"
    assert len(rig.smtp.to(primary)) == 1
    assert len(rig.smtp.to(physician)) == 1
    for raw in (rig.smtp.to(primary)[0], rig.smtp.to(physician)[0]):
        body = _body(raw)
        assert "ESCALATION: cycle day 2: CRS window" in body
        assert "acknowledge within 2 min" in body
        assert f"also paged at once: person physician-{rig.tag}" in body

    await _step(rig, minutes=1, seconds=59)
    assert rig.smtp.to(f"secondary-{rig.tag}@h.test") == []
    await _step(rig, seconds=1)
    assert len(rig.smtp.to(f"secondary-{rig.tag}@h.test")) == 1
    await _step(rig, minutes=2)
    assert len(rig.smtp.to(f"attending-{rig.tag}@h.test")) == 1
    # The chain's second pass starts 2 min later with primary and physician again.
    await _step(rig, minutes=2)
    assert len(rig.smtp.to(primary)) == 2
    assert len(rig.smtp.to(physician)) == 2

    # The policy frozen for audit: in the escalation's snapshot and its timeline.
    snapshot = json.loads(
        await rig.pool.fetchval(
            "SELECT snapshot FROM escalations WHERE dedup_key = $1", alert.dedup_key
        )
    )
    assert snapshot["policy_id"] == f"pol-{rig.tag}+early-cycle"
    assert snapshot["early_cycle"] == {
        "cycle_day": 2,
        "usual_policy_id": f"pol-{rig.tag}",
        "overridden": True,
        "ack_wait_s": 120,
        "extra_targets": [{"kind": "person", "ref": f"physician-{rig.tag}"}],
    }
    assert [s["wait_s"] for s in snapshot["steps"]] == [120, 120, 120]
    timeline = await rig.desk.timeline(alert.dedup_key)
    opened = timeline["events"][0]
    assert opened["kind"] == "opened"
    assert opened["detail"]["early_cycle"]["cycle_day"] == 2


async def test_a_fever_outside_the_window_of_the_same_team_keeps_the_usual_chain(
    rig: Rig,
) -> None:
    await _early_team(rig)
    alert = _alert(f"P-{rig.tag}")  # no cycle_day evidence: e.g. day 15
    assert await rig.service.handle_alert(alert)
    assert len(rig.smtp.to(f"primary-{rig.tag}@h.test")) == 1
    assert rig.smtp.to(f"physician-{rig.tag}@h.test") == []
    assert "CRS window" not in _body(rig.smtp.to(f"primary-{rig.tag}@h.test")[0])
    await _step(rig, minutes=4, seconds=59)
    assert rig.smtp.to(f"secondary-{rig.tag}@h.test") == []
    await _step(rig, seconds=1)
    assert len(rig.smtp.to(f"secondary-{rig.tag}@h.test")) == 1
    snapshot = json.loads(
        await rig.pool.fetchval(
            "SELECT snapshot FROM escalations WHERE dedup_key = $1", alert.dedup_key
        )
    )
    assert snapshot["policy_id"] == f"pol-{rig.tag}" and "early_cycle" not in snapshot


async def test_team_without_an_override_pages_its_usual_chain_and_says_crs_window(
    rig: Rig,
) -> None:
    await _early_team(rig, override=False)
    alert = _day(_alert(f"P-{rig.tag}"), 9, limit=9)
    assert await rig.service.handle_alert(alert)
    body = _body(rig.smtp.to(f"primary-{rig.tag}@h.test")[0])
    assert "ESCALATION: cycle day 9: CRS window" in body
    assert "usual chain" in body
    assert rig.smtp.to(f"physician-{rig.tag}@h.test") == []
    await _step(rig, minutes=2)
    assert rig.smtp.to(f"secondary-{rig.tag}@h.test") == []
    await _step(rig, minutes=3)
    assert len(rig.smtp.to(f"secondary-{rig.tag}@h.test")) == 1
    snapshot = json.loads(
        await rig.pool.fetchval(
            "SELECT snapshot FROM escalations WHERE dedup_key = $1", alert.dedup_key
        )
    )
    assert snapshot["policy_id"] == f"pol-{rig.tag}"
    assert snapshot["early_cycle"]["overridden"] is False


async def test_an_edit_after_the_fever_opened_does_not_change_its_running_chain(
    rig: Rig,
) -> None:
    team, patient = await _early_team(rig)
    alert = _day(_alert(patient), 1)
    assert await rig.service.handle_alert(alert)
    assert await rig.desk.registry.remove_early_cycle(team, by="person:lead-nurse")
    await _step(rig, minutes=2)
    assert len(rig.smtp.to(f"secondary-{rig.tag}@h.test")) == 1


async def test_early_cycle_override_is_validated_and_every_change_audited(rig: Rig) -> None:
    team, _ = await _early_team(rig, override=False)
    registry = rig.desk.registry
    assert await registry.early_cycle(team) is None
    bad: list[dict[str, Any]] = [
        {"changed_by": "p:a"},  # changes nothing
        {"ack_wait_minutes": 0, "changed_by": "p:a"},
        {"ack_wait_minutes": 1, "changed_by": ""},
        {"extra_targets": [{"kind": "pager", "ref": "x"}], "changed_by": "p:a"},
    ]
    for body in bad:
        with pytest.raises(ValidationError):
            EarlyCycleEscalationIn.model_validate(body)
    assert not await rig.desk.early_cycle(
        "no-such-team", {"ack_wait_minutes": 2, "changed_by": "p:a"}
    )

    assert await rig.desk.early_cycle(team, {"ack_wait_minutes": 2, "changed_by": "p:a"})
    targets = [{"kind": "schedule", "ref": f"sched-{rig.tag}"}]
    assert await rig.desk.early_cycle(team, {"extra_targets": targets, "changed_by": "p:b"})
    got = await registry.early_cycle(team)
    assert got is not None
    assert got["ack_wait_s"] is None
    assert got["extra_targets"] == targets
    assert got["updated_by"] == "p:b"
    assert await registry.remove_early_cycle(team, by="p:c")
    assert await registry.early_cycle(team) is None
    rows = await rig.pool.fetch(
        "SELECT actor, details FROM audit_log "
        "WHERE action = 'notify.early_cycle_escalation_changed' AND subject = $1 ORDER BY seq",
        f"care_team:{team}",
    )
    changes = [(r["actor"], json.loads(r["details"])) for r in rows]
    assert [actor for actor, _ in changes] == ["p:a", "p:b", "p:c"]
    assert changes[0][1] == {"before": None, "after": {"ack_wait_s": 120, "extra_targets": []}}
    assert changes[1][1]["after"] == {"ack_wait_s": None, "extra_targets": targets}
    assert changes[2][1]["after"] is None


async def test_an_override_naming_a_deleted_schedule_pages_the_fallback_at_once(
    rig: Rig,
) -> None:
    """The physician rotation named by the override no longer exists: the page meant for it
    goes to the team's fallback address at once rather than to nobody."""
    team, patient = await _early_team(rig, override=False)
    assert await rig.desk.early_cycle(
        team,
        {
            "extra_targets": [{"kind": "schedule", "ref": f"gone-{rig.tag}"}],
            "changed_by": "p:a",
        },
    )
    assert await rig.service.handle_alert(_day(_alert(patient), 3))
    assert len(rig.smtp.to(f"primary-{rig.tag}@h.test")) == 1
    assert len(rig.smtp.to(f"fallback-{rig.tag}@h.test")) == 1
