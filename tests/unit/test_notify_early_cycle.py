"""The early-cycle escalation: which chain a fever in the cytokine-release-syndrome window is
frozen on, decided from the alerts the rules really produce (cycle day 1-3, the step-up day and
the day after), and what that chain does. In memory: no database, no clock but the ones given."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, cast
from uuid import UUID, uuid4

import pytest

from schemas.events import Alert, AlertPhase
from services.notify.domain.early_cycle import (
    EARLY_CYCLE_POLICY_SUFFIX,
    EarlyCycleOverride,
    crs_cycle_day,
    crs_note,
    crs_sms_note,
    last_page_after_s,
    select_policy,
)
from services.notify.domain.escalation import (
    EarlyCycle,
    NotifyRecipient,
    PolicySnapshot,
    StepSnapshot,
    Target,
    Tick,
    advance,
    opened,
    page_until_acknowledged,
    snapshot_from_json,
    snapshot_to_json,
)
from services.notify.domain.monitoring_end import PatientStanding
from services.notify.domain.routing import UNASSIGNED_CARE_TEAM
from services.notify.domain.schedule import Rotation
from services.notify.service_layer.escalation import (
    EscalationConfig,
    EscalationService,
)
from services.notify.service_layer.unit_of_work import UnitOfWorkFactory
from services.rules.domain.config import PatientProfile, RulesConfig
from services.rules.domain.engine import RulesEngine
from tests.fakes.notify_store import AsItsOwnUnitOfWork
from tests.support.rules import Home, run_stream

CYCLE_START = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
DAY = timedelta(days=1)
PATIENT = "P-early"
PHYSICIAN = Target("person", "oncall-physician")


def fever_at(offset: timedelta, *, cycle_start: datetime | None = CYCLE_START) -> Alert:
    """The start alert the rules decide for one 38.6 °C reading at cycle start + ``offset``
    (the step-up on day 8, as in the prescribing information)."""
    profiles = (
        {}
        if cycle_start is None
        else {PATIENT: PatientProfile(patient_id=PATIENT, cycle_start=cycle_start, step_up_day=8)}
    )
    engine = RulesEngine(RulesConfig(profiles=profiles))
    alerts = run_stream(engine, [Home(PATIENT, CYCLE_START + offset).temp(0, 38.6)])
    assert [a.phase for a in alerts] == [AlertPhase.START]
    return alerts[0]


def nurses() -> Rotation:
    return Rotation(
        schedule_id="nurses",
        timezone="Europe/Berlin",
        start_date=date(2026, 1, 1),
        handoff_time=time(8, 0),
        shift_days=1,
        participants=("nurse-a", "nurse-b"),
    )


def usual_policy() -> PolicySnapshot:
    """On-call nurse, 5 min, fellow, 5 min, once more: the team's chain for any fever."""
    return PolicySnapshot(
        policy_id="onc",
        steps=(
            StepSnapshot(targets=(Target("schedule", "nurses"),), wait_s=300),
            StepSnapshot(targets=(Target("person", "fellow"),), wait_s=300),
        ),
        repeat_count=1,
        schedules={"nurses": nurses()},
    )


def override(wait_s: int | None = 120) -> EarlyCycleOverride:
    return EarlyCycleOverride(ack_wait_s=wait_s, extra_targets=(PHYSICIAN,))


# -- must use the early-cycle chain: the CRS window, edges included ------------------------------


@pytest.mark.parametrize(
    ("offset", "day"),
    [
        (timedelta(0), 1),  # the first instant of the cycle
        (DAY + timedelta(hours=6), 2),
        (3 * DAY - timedelta(seconds=1), 3),  # the last second of day 3
        (7 * DAY, 8),  # the first instant of the step-up day
        (7 * DAY + timedelta(hours=20), 8),
        (8 * DAY + timedelta(hours=2), 9),  # the day after the step-up
        (9 * DAY - timedelta(seconds=1), 9),  # its last second
    ],
)
def test_fever_in_the_crs_window_is_frozen_on_the_early_cycle_chain(
    offset: timedelta, day: int
) -> None:
    alert = fever_at(offset)
    assert crs_cycle_day(alert) == day
    chosen = select_policy(usual_policy(), override(), alert)
    assert chosen.policy_id == "onc" + EARLY_CYCLE_POLICY_SUFFIX
    assert chosen.early_cycle == EarlyCycle(
        cycle_day=day,
        usual_policy_id="onc",
        overridden=True,
        ack_wait_s=120,
        extra_targets=(PHYSICIAN,),
    )
    assert chosen.steps[0].targets == (Target("schedule", "nurses"), PHYSICIAN)
    assert [s.wait_s for s in chosen.steps] == [120, 120]


# -- must not: outside the window, edges included -------------------------------------------------


@pytest.mark.parametrize(
    "offset",
    [
        3 * DAY,  # the first instant of day 4
        6 * DAY + timedelta(hours=23, minutes=59, seconds=59),  # the last second of day 7
        9 * DAY,  # the first instant of day 10
        14 * DAY + timedelta(hours=3),  # day 15
        -timedelta(hours=1),  # before the cycle started
    ],
)
def test_fever_outside_the_crs_window_keeps_the_usual_chain(offset: timedelta) -> None:
    alert = fever_at(offset)
    assert crs_cycle_day(alert) is None
    usual = usual_policy()
    assert select_policy(usual, override(), alert) is usual


def test_fever_of_a_patient_without_a_cycle_on_record_keeps_the_usual_chain() -> None:
    alert = fever_at(DAY, cycle_start=None)
    usual = usual_policy()
    assert select_policy(usual, override(), alert) is usual


def test_an_all_clear_is_never_taken_for_the_crs_window() -> None:
    alert = fever_at(DAY)
    ended = alert.model_copy(update={"phase": AlertPhase.END})
    assert crs_cycle_day(ended) is None


# -- what the early-cycle chain does ------------------------------------------------------------


def _pages(policy: PolicySnapshot, until: datetime, start: datetime) -> list[tuple[float, str]]:
    """(seconds after start, recipient) of every page an unanswered chain sends."""
    state = opened(start)
    out: list[tuple[float, str]] = []
    while state.due_at is not None and state.due_at <= until:
        at = state.due_at
        transition = advance(policy, state, Tick(now=at))
        out += [
            ((at - start).total_seconds(), c.recipient)
            for c in transition.commands
            if isinstance(c, NotifyRecipient)
        ]
        state = transition.state
    return out


def test_day_two_pages_the_physician_at_once_and_repages_after_the_shorter_wait() -> None:
    """A team on the default chain (on-call address every 5 min, 4 pages): on day 2 the
    physician is paged with it at once, and both again every 2 min, not a second sooner."""
    alert = fever_at(DAY + timedelta(hours=6))
    usual = page_until_acknowledged("default:onc", "oncall@h.test")
    chosen = select_policy(usual, override(), alert)
    start = alert.ingest_time
    pages = _pages(chosen, start + timedelta(hours=1), start)
    assert pages[:2] == [(0.0, "email:oncall@h.test"), (0.0, "person:oncall-physician")]
    first_state = advance(chosen, opened(start), Tick(now=start)).state
    assert first_state.due_at == start + timedelta(minutes=2)
    almost = advance(chosen, first_state, Tick(now=start + timedelta(seconds=119)))
    assert almost.commands == ()
    assert pages[2:4] == [(120.0, "email:oncall@h.test"), (120.0, "person:oncall-physician")]


def test_the_shorter_wait_never_ends_the_paging_sooner_than_the_usual_chain() -> None:
    """Usual: pages at 0, 5, 10, 15 min. Early (2 min): every 2 min until at least 15 min."""
    usual = page_until_acknowledged("default:onc", "oncall@h.test")
    chosen = select_policy(usual, override(), fever_at(DAY))
    assert last_page_after_s(usual.steps, usual.repeat_count) == 900
    assert chosen.repeat_count == 8
    assert last_page_after_s(chosen.steps, chosen.repeat_count) == 960
    start = CYCLE_START
    times = sorted({t for t, _ in _pages(chosen, start + timedelta(hours=2), start)})
    assert times == [120.0 * n for n in range(9)]
    two_steps = usual_policy()
    early = select_policy(two_steps, override(60), fever_at(DAY))
    assert last_page_after_s(early.steps, early.repeat_count) >= last_page_after_s(
        two_steps.steps, two_steps.repeat_count
    )


def test_the_override_never_lengthens_a_step_that_already_waits_less() -> None:
    usual = PolicySnapshot(
        policy_id="fast",
        steps=(
            StepSnapshot(targets=(Target("person", "nurse"),), wait_s=60),
            StepSnapshot(targets=(Target("person", "fellow"),), wait_s=600),
        ),
        repeat_count=0,
    )
    chosen = select_policy(usual, override(120), fever_at(DAY))
    assert [s.wait_s for s in chosen.steps] == [60, 120]


def test_extra_targets_only_keep_the_usual_waits() -> None:
    chosen = select_policy(usual_policy(), override(None), fever_at(DAY))
    assert [s.wait_s for s in chosen.steps] == [300, 300]
    assert chosen.repeat_count == 1
    assert chosen.steps[0].targets[-1] == PHYSICIAN
    assert chosen.steps[1].targets == (Target("person", "fellow"),)


def test_a_target_already_in_the_first_step_is_not_paged_twice() -> None:
    nurse_override = EarlyCycleOverride(ack_wait_s=None, extra_targets=(Target("person", "n"),))
    usual = PolicySnapshot(
        policy_id="p",
        steps=(StepSnapshot(targets=(Target("person", "n"),), wait_s=300),),
        repeat_count=0,
    )
    chosen = select_policy(usual, nurse_override, fever_at(DAY))
    assert chosen.steps[0].targets == (Target("person", "n"),)


def test_without_an_override_the_usual_chain_runs_unchanged_and_records_the_day() -> None:
    usual = usual_policy()
    chosen = select_policy(usual, None, fever_at(DAY + timedelta(hours=1)))
    assert (chosen.policy_id, chosen.steps, chosen.repeat_count, chosen.schedules) == (
        usual.policy_id,
        usual.steps,
        usual.repeat_count,
        usual.schedules,
    )
    assert chosen.early_cycle == EarlyCycle(cycle_day=2, usual_policy_id="onc", overridden=False)
    assert crs_note(chosen.early_cycle).startswith(
        "ESCALATION: cycle day 2: CRS window (cytokine release syndrome risk)."
    )
    assert "usual chain" in crs_note(chosen.early_cycle)


def test_an_override_schedule_target_comes_with_its_rotation() -> None:
    physicians = Rotation(
        schedule_id="physicians",
        timezone="UTC",
        start_date=date(2026, 1, 1),
        handoff_time=time(8, 0),
        shift_days=7,
        participants=("dr-a",),
    )
    with pytest.raises(ValueError, match="not in the override"):
        EarlyCycleOverride(ack_wait_s=None, extra_targets=(Target("schedule", "physicians"),))
    with_schedule = EarlyCycleOverride(
        ack_wait_s=None,
        extra_targets=(Target("schedule", "physicians"),),
        schedules={"physicians": physicians},
    )
    chosen = select_policy(usual_policy(), with_schedule, fever_at(DAY))
    assert set(chosen.schedules) == {"nurses", "physicians"}
    first = advance(chosen, opened(CYCLE_START), Tick(now=CYCLE_START + DAY))
    assert "person:dr-a" in [c.recipient for c in first.commands if isinstance(c, NotifyRecipient)]


@pytest.mark.parametrize("kwargs", [{"ack_wait_s": None}, {"ack_wait_s": 0}])
def test_an_override_that_changes_nothing_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EarlyCycleOverride(**kwargs)


def test_the_frozen_early_cycle_policy_round_trips_and_old_snapshots_read_as_none() -> None:
    chosen = select_policy(usual_policy(), override(), fever_at(DAY))
    stored = json.loads(json.dumps(snapshot_to_json(chosen)))
    assert stored["early_cycle"] == {
        "cycle_day": 2,
        "usual_policy_id": "onc",
        "overridden": True,
        "ack_wait_s": 120,
        "extra_targets": [{"kind": "person", "ref": "oncall-physician"}],
    }
    assert snapshot_from_json(stored) == chosen
    old = snapshot_to_json(usual_policy())
    assert "early_cycle" not in old
    assert snapshot_from_json(old).early_cycle is None


def test_the_page_states_the_cycle_day_the_window_and_the_policy() -> None:
    chosen = select_policy(usual_policy(), override(), fever_at(DAY + timedelta(hours=3)))
    assert chosen.early_cycle is not None
    note = crs_note(chosen.early_cycle)
    assert "cycle day 2: CRS window" in note
    assert "acknowledge within 2 min" in note
    assert "also paged at once: person oncall-physician" in note
    assert crs_sms_note(chosen.early_cycle) == "Cycle day 2: CRS window."
    odd = EarlyCycle(cycle_day=9, usual_policy_id="p", overridden=True, ack_wait_s=90)
    assert "acknowledge within 90 s" in crs_note(odd)


# -- selection through the service, over an in-memory store --------------------------------------


class MemoryStore(AsItsOwnUnitOfWork):
    """The part of the repositories ``handle_alert`` uses to open an escalation, as its own
    unit of work for the reads (the escalation is opened in ``_Opening``)."""

    def __init__(self, teams: dict[str, str], policies: dict[str, PolicySnapshot]) -> None:
        self.teams = teams
        self.team_policies = policies
        self.overrides: dict[str, EarlyCycleOverride] = {}
        self.override_reads: list[str] = []
        self.frozen: dict[str, tuple[str, PolicySnapshot]] = {}

    async def standing_of(self, patient_id: str, device_id: str) -> PatientStanding | None:
        team = self.teams.get(patient_id)
        return None if team is None else PatientStanding(team)

    async def load_policy(self, care_team_id: str) -> PolicySnapshot | None:
        return self.team_policies.get(care_team_id)

    async def early_cycle_override(self, care_team_id: str) -> EarlyCycleOverride | None:
        self.override_reads.append(care_team_id)
        return self.overrides.get(care_team_id)

    async def escalation_id_for(self, dedup_key: str) -> UUID | None:
        return None

    async def quiet_hours(self, care_team_id: str) -> None:
        return None

    def unit_of_work(self, *, transaction: bool = True) -> Any:
        """Reads (no transaction) go to the store itself; the escalation is opened in an
        ``_Opening``."""
        return _Opening(self) if transaction else self


class _Opening:
    """The unit of work ``handle_alert`` opens an escalation in: notes the policy frozen."""

    def __init__(self, store: MemoryStore) -> None:
        self.escalations = self.outbox = self
        self._store = store

    async def __aenter__(self) -> _Opening:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def add(
        self, alert: Alert, *, care_team_id: str, snapshot: PolicySnapshot, **_: Any
    ) -> UUID | None:
        self._store.frozen[alert.dedup_key] = (care_team_id, snapshot)
        return uuid4()

    async def add_opened(self, *_: Any, **__: Any) -> list[Any]:
        return []

    async def commit(self) -> None:
        return None


class MemoryAlerts:
    async def record_alert(self, alert: Alert) -> bool:
        return True


def _service(store: MemoryStore) -> EscalationService:
    return EscalationService(
        unit_of_work=cast(UnitOfWorkFactory, store.unit_of_work),
        alerts=MemoryAlerts(),
        email=cast(Any, None),
        sms=None,
        webhook=None,
        config=EscalationConfig(
            sender_address="vigil@h.test", public_base_url="http://x", ack_secret=b"s" * 32
        ),
        clock=lambda: CYCLE_START + 20 * DAY,
    )


async def test_service_freezes_the_early_chain_on_day_two_and_the_usual_one_on_day_fifteen() -> (
    None
):
    store = MemoryStore({PATIENT: "onc"}, {"onc": usual_policy()})
    store.overrides["onc"] = override()
    service = _service(store)

    day2 = fever_at(DAY + timedelta(hours=6))
    assert await service.handle_alert(day2)
    team, frozen = store.frozen[day2.dedup_key]
    assert team == "onc"
    assert frozen.policy_id == "onc+early-cycle"
    assert frozen.early_cycle is not None and frozen.early_cycle.cycle_day == 2
    assert PHYSICIAN in frozen.steps[0].targets

    day15 = fever_at(14 * DAY + timedelta(hours=6))
    assert await service.handle_alert(day15)
    assert store.frozen[day15.dedup_key] == ("onc", usual_policy())
    # The override is read only for an alert in the window.
    assert store.override_reads == ["onc"]


async def test_service_step_up_day_plus_one_uses_the_early_chain_day_ten_does_not() -> None:
    store = MemoryStore({PATIENT: "onc"}, {"onc": usual_policy()})
    store.overrides["onc"] = override()
    service = _service(store)
    day9 = fever_at(8 * DAY + timedelta(hours=23))
    day10 = fever_at(9 * DAY + timedelta(minutes=1))
    assert await service.handle_alert(day9)
    assert await service.handle_alert(day10)
    assert store.frozen[day9.dedup_key][1].policy_id == "onc+early-cycle"
    assert store.frozen[day10.dedup_key][1].early_cycle is None


async def test_service_team_without_an_override_keeps_its_chain_on_day_two() -> None:
    store = MemoryStore({PATIENT: "onc"}, {"onc": usual_policy()})
    service = _service(store)
    alert = fever_at(DAY)
    assert await service.handle_alert(alert)
    _, frozen = store.frozen[alert.dedup_key]
    assert frozen.steps == usual_policy().steps
    assert frozen.early_cycle == EarlyCycle(cycle_day=2, usual_policy_id="onc", overridden=False)


async def test_service_unregistered_patient_in_the_window_gets_the_fallback_chain() -> None:
    store = MemoryStore({}, {})
    service = _service(store)
    alert = fever_at(DAY)
    assert await service.handle_alert(alert)
    team, frozen = store.frozen[alert.dedup_key]
    assert team == UNASSIGNED_CARE_TEAM
    assert frozen.policy_id == f"unroutable:{UNASSIGNED_CARE_TEAM}"
    assert frozen.early_cycle is not None and not frozen.early_cycle.overridden
    assert store.override_reads == []
