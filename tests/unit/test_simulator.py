"""The simulated fleet: scenarios, numbering and payloads, driven by a hand-advanced clock."""

from __future__ import annotations

import itertools
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from schemas.device import (
    PumpAlarmCode,
    PumpEvent,
    PumpEventKind,
    PumpState,
    PumpStatus,
    TemperatureReading,
    parse_device_message,
)
from schemas.topics import parse_topic
from vigil_tools.simulator import (
    Fleet,
    Scenario,
    ScenarioSpecError,
    ScenarioTiming,
    SimulatorSettings,
    fleet_registry,
    parse_scenario_spec,
)
from vigil_tools.simulator.fleet import Outgoing
from vigil_tools.simulator.publisher import settings_from_args
from vigil_tools.simulator.registry import REGISTRY_VALID_FROM

START = datetime(2025, 3, 1, 2, 0, tzinfo=UTC)


def drive(fleet: Fleet, until: datetime) -> list[Outgoing]:
    """Advance the fleet call by call, at each instant it asks for, up to ``until``."""
    out: list[Outgoing] = []
    while fleet.next_due() <= until:
        out += fleet.advance(fleet.next_due())
    return out


def temperatures(out: list[Outgoing], device_id: str) -> list[TemperatureReading]:
    return [
        o.message
        for o in out
        if isinstance(o.message, TemperatureReading) and o.device_id == device_id
    ]


@pytest.mark.parametrize("seed", [1, 2, 3, 42, 1234])
@pytest.mark.parametrize("interval_s", [1.0, 5.0])
def test_fever_reaches_paging_threshold_by_onset(seed: int, interval_s: float) -> None:
    """A fever patient reads >= 38.3 °C (in fact >= 38.5) by fever_onset_s, from normal."""
    timing = ScenarioTiming(fever_onset_s=20.0)
    fleet = Fleet([Scenario.FEVER], start=START, interval_s=interval_s, seed=seed, timing=timing)
    readings = temperatures(drive(fleet, START + timedelta(seconds=20)), "thermo-P-0001")

    assert readings[0].value < 37.5, "the fever starts from a normal temperature"
    assert max(r.value for r in readings) >= 38.5
    assert any(r.value >= 38.3 for r in readings)
    assert all(r.device_time <= START + timedelta(seconds=20) for r in readings)


def test_fever_stays_febrile_after_onset() -> None:
    """Once the fever has set in, every later reading stays at or above 38.5 °C."""
    fleet = Fleet([Scenario.FEVER], start=START, interval_s=5.0, seed=7)
    out = drive(fleet, START + timedelta(hours=6))
    onset = START + timedelta(seconds=20)
    late = [r for r in temperatures(out, "thermo-P-0001") if r.device_time >= onset]
    assert len(late) > 4000
    assert min(r.value for r in late) >= 38.5


def test_normal_never_reaches_38_over_a_long_run() -> None:
    """Normal patients stay within 36.6-37.2 °C for two days of readings every minute."""
    fleet = Fleet([Scenario.NORMAL] * 10, start=START, interval_s=60.0, seed=1)
    out = drive(fleet, START + timedelta(days=2))
    values = [o.message.value for o in out if isinstance(o.message, TemperatureReading)]

    assert len(values) >= 10 * 2 * 24 * 60 - 10
    assert max(values) < 38.0
    assert min(values) >= 36.6 and max(values) <= 37.2
    assert len(set(values)) > 1, "readings carry noise, not one constant"


def test_normal_pump_runs_at_10_ml_h_and_drains() -> None:
    """A normal pump reports running at 10 mL/h, its volume falling by about 10 mL an hour."""
    fleet = Fleet([Scenario.NORMAL], start=START, interval_s=60.0, seed=3)
    out = drive(fleet, START + timedelta(hours=2))
    statuses = [o.message for o in out if isinstance(o.message, PumpStatus)]
    events = [o.message for o in out if isinstance(o.message, PumpEvent)]

    assert {s.state for s in statuses} == {PumpState.RUNNING}
    assert {s.rate_ml_h for s in statuses} == {10.0}
    volumes = [s.volume_remaining_ml for s in statuses]
    assert volumes == sorted(volumes, reverse=True)
    hours = (statuses[-1].device_time - statuses[0].device_time).total_seconds() / 3600
    assert volumes[0] - volumes[-1] == pytest.approx(10.0 * hours, abs=0.02)
    assert events == [], "a normal pump raises no alarms"


def test_normal_pump_over_days_changes_bags_without_alarms() -> None:
    """Over three days a normal pump never alarms or runs dry: the bag is changed instead."""
    fleet = Fleet([Scenario.NORMAL] * 3, start=START, interval_s=600.0, seed=5)
    out = drive(fleet, START + timedelta(days=3))
    events = [o.message for o in out if isinstance(o.message, PumpEvent)]
    statuses = [o.message for o in out if isinstance(o.message, PumpStatus)]

    assert events and {e.event for e in events} == {PumpEventKind.BAG_CHANGED}
    assert min(s.volume_remaining_ml for s in statuses) > 0
    assert {s.state for s in statuses} == {PumpState.RUNNING}


def test_occlusion_raises_alarm_at_configured_time() -> None:
    """An occlusion pump raises occlusion_downstream at exactly occlusion_after_s and stops."""
    timing = ScenarioTiming(occlusion_after_s=30.0)
    fleet = Fleet([Scenario.OCCLUSION], start=START, interval_s=5.0, seed=1, timing=timing)
    out = drive(fleet, START + timedelta(minutes=10))
    pump = [o.message for o in out if o.device_id == "pump-P-0001"]
    alarms = [m for m in pump if isinstance(m, PumpEvent)]

    assert len(alarms) == 1
    alarm = alarms[0]
    assert alarm.event is PumpEventKind.ALARM_RAISED
    assert alarm.alarm is PumpAlarmCode.OCCLUSION_DOWNSTREAM
    assert alarm.device_time == START + timedelta(seconds=30)

    before = [m for m in pump if isinstance(m, PumpStatus) and m.device_time < alarm.device_time]
    after = [m for m in pump if isinstance(m, PumpStatus) and m.device_time >= alarm.device_time]
    assert {s.state for s in before} == {PumpState.RUNNING}
    assert {s.state for s in after} == {PumpState.ALARMING}
    assert after[0].device_time == alarm.device_time, "the state change is reported at once"
    assert len({s.volume_remaining_ml for s in after}) == 1, "nothing flows while occluded"


def test_occlusion_alarm_time_does_not_depend_on_call_times() -> None:
    """A late call still stamps the alarm with the configured time, not the time of the call."""
    timing = ScenarioTiming(occlusion_after_s=30.0)
    fleet = Fleet([Scenario.OCCLUSION], start=START, interval_s=5.0, seed=1, timing=timing)
    out = fleet.advance(START + timedelta(seconds=100))
    alarm = next(o.message for o in out if isinstance(o.message, PumpEvent))
    assert alarm.device_time == START + timedelta(seconds=30)


def test_occlusion_clears_and_infusion_restarts_when_configured() -> None:
    """With occlusion_clear_after_s the alarm clears, the infusion restarts and volume flows."""
    timing = ScenarioTiming(occlusion_after_s=30.0, occlusion_clear_after_s=90.0)
    fleet = Fleet([Scenario.OCCLUSION], start=START, interval_s=5.0, seed=1, timing=timing)
    out = drive(fleet, START + timedelta(minutes=10))
    events = [o.message for o in out if isinstance(o.message, PumpEvent)]
    statuses = [o.message for o in out if isinstance(o.message, PumpStatus)]

    assert [(e.event, e.device_time - START) for e in events] == [
        (PumpEventKind.ALARM_RAISED, timedelta(seconds=30)),
        (PumpEventKind.ALARM_CLEARED, timedelta(seconds=90)),
        (PumpEventKind.INFUSION_STARTED, timedelta(seconds=90)),
    ]
    assert statuses[-1].state is PumpState.RUNNING
    late = [s for s in statuses if s.device_time > START + timedelta(seconds=90)]
    assert late[0].volume_remaining_ml > late[-1].volume_remaining_ml


def test_seq_strictly_increasing_per_device_and_message_ids_unique() -> None:
    """Each device numbers its messages strictly upwards, events included; ids never repeat."""
    timing = ScenarioTiming(occlusion_after_s=12.0, occlusion_clear_after_s=40.0)
    fleet = Fleet(
        parse_scenario_spec("fever:1,occlusion:2,normal:rest", 6),
        start=START,
        interval_s=2.0,
        seed=9,
        timing=timing,
    )
    out = drive(fleet, START + timedelta(minutes=15))
    per_device: dict[str, list[int]] = defaultdict(list)
    for o in out:
        per_device[o.device_id].append(o.message.seq)

    assert len(per_device) == 12
    for device_id, seqs in per_device.items():
        assert all(a < b for a, b in itertools.pairwise(seqs)), device_id
    assert len({o.message.message_id for o in out}) == len(out)


def test_seq_of_a_later_run_continues_above_an_earlier_one() -> None:
    """A simulator restarted later numbers above the earlier run, as the contract asks."""
    first = Fleet([Scenario.NORMAL], start=START, interval_s=1.0, seed=1)
    first_out = drive(first, START + timedelta(hours=1))
    restart = START + timedelta(hours=1, seconds=5)
    second = Fleet([Scenario.NORMAL], start=restart, interval_s=1.0, seed=1)
    second_out = drive(second, restart + timedelta(seconds=10))

    last_seq = max(o.message.seq for o in first_out if o.device_id == "thermo-P-0001")
    assert min(o.message.seq for o in second_out if o.device_id == "thermo-P-0001") > last_seq


def test_every_message_round_trips_through_the_contract() -> None:
    """Every payload parses back with parse_device_message to the same message, on its topic."""
    timing = ScenarioTiming(occlusion_after_s=20.0, occlusion_clear_after_s=50.0)
    fleet = Fleet(
        parse_scenario_spec("fever:1,occlusion:1,normal:rest", 4),
        start=START,
        interval_s=3.0,
        seed=11,
        timing=timing,
    )
    out = drive(fleet, START + timedelta(minutes=5))
    kinds = set()
    for o in out:
        parsed = parse_device_message(o.payload())
        assert parsed == o.message
        assert b'"schema":' in o.payload()
        topic = parse_topic(o.topic)
        assert topic is not None
        assert (topic.device_id, topic.channel) == (o.device_id, o.channel)
        kinds.add(type(parsed))
    assert kinds == {TemperatureReading, PumpStatus, PumpEvent}


def test_same_seed_same_messages_and_other_seed_differs() -> None:
    """The fleet is deterministic: same seed and start, same payloads; another seed, others."""

    def payloads(seed: int) -> list[bytes]:
        fleet = Fleet(
            parse_scenario_spec("fever:1,occlusion:1,normal:rest", 5),
            start=START,
            interval_s=5.0,
            seed=seed,
        )
        return [o.payload() for o in drive(fleet, START + timedelta(minutes=3))]

    assert payloads(1) == payloads(1)
    assert payloads(1) != payloads(2)


def test_device_ids_and_topics_follow_the_contract() -> None:
    """Patient n has thermo-P-000n and pump-P-000n, publishing on their own topics."""
    fleet = Fleet([Scenario.NORMAL] * 2, start=START, interval_s=5.0, seed=1)
    out = drive(fleet, START + timedelta(seconds=10))
    assert {o.topic for o in out} == {
        "vigil/v1/dev/thermo-P-0001/temperature",
        "vigil/v1/dev/pump-P-0001/pump-status",
        "vigil/v1/dev/thermo-P-0002/temperature",
        "vigil/v1/dev/pump-P-0002/pump-status",
    }
    assert [p.patient_id for p in fleet.patients] == ["P-0001", "P-0002"]


def test_fleet_refuses_naive_times() -> None:
    """The fleet takes only timezone-aware times, so no naive time reaches a payload."""
    with pytest.raises(ValueError, match="timezone-aware"):
        Fleet([Scenario.NORMAL], start=datetime(2025, 1, 1), interval_s=5.0, seed=1)  # noqa: DTZ001 - the point of the test
    fleet = Fleet([Scenario.NORMAL], start=START, interval_s=5.0, seed=1)
    with pytest.raises(ValueError, match="timezone-aware"):
        fleet.advance(datetime(2025, 3, 1, 3, 0))  # noqa: DTZ001 - the point of the test


@pytest.mark.parametrize(
    ("spec", "n", "expected"),
    [
        ("fever:1,occlusion:1,normal:rest", 4, "FONN"),
        ("fever:1,occlusion:1,normal:rest", 2, "FO"),
        ("normal:rest", 3, "NNN"),
        ("", 3, "NNN"),
        ("fever:2", 4, "FFNN"),
        (" Fever : 1 , occlusion:rest ", 3, "FOO"),
        ("occlusion:rest,fever:1", 3, "OOF"),
        ("normal:1,fever:1,normal:0", 3, "NFN"),
    ],
)
def test_scenario_spec_assigns_patients_in_order(spec: str, n: int, expected: str) -> None:
    """Entries are assigned in order; 'rest' takes the remainder; unnamed patients are normal."""
    letter = {Scenario.FEVER: "F", Scenario.OCCLUSION: "O", Scenario.NORMAL: "N"}
    assert "".join(letter[s] for s in parse_scenario_spec(spec, n)) == expected


@pytest.mark.parametrize(
    ("spec", "n", "message"),
    [
        ("flu:1", 3, "unknown scenario 'flu'"),
        ("fever", 3, "not 'name:count' or 'name:rest'"),
        ("fever:-1", 3, "not 'name:count' or 'name:rest'"),
        ("fever:one", 3, "not 'name:count' or 'name:rest'"),
        ("fever:rest,normal:rest", 3, "'rest' may appear once"),
        ("fever:2,occlusion:2", 3, "names 4 patients but the fleet has 3"),
        ("normal:rest", 0, "at least one patient"),
    ],
)
def test_scenario_spec_errors_say_what_is_wrong(spec: str, n: int, message: str) -> None:
    """A spec that cannot be applied raises ScenarioSpecError naming the problem."""
    with pytest.raises(ScenarioSpecError, match=message):
        parse_scenario_spec(spec, n)


def test_settings_refuse_a_bad_scenario_at_start_up() -> None:
    """SimulatorSettings validates the spec against the fleet size when built."""
    with pytest.raises(ValueError, match="names 3 patients but the fleet has 2"):
        SimulatorSettings(patients=2, scenario="fever:3")
    with pytest.raises(ValueError, match="later than occlusion_after_s"):
        SimulatorSettings(occlusion_after_s=30, occlusion_clear_after_s=10)


def test_settings_read_env_and_flags_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """VIGIL_SIM_* and VIGIL_MQTT_* configure the simulator; command-line flags win over them."""
    for name in ("VIGIL_SIM_DURATION_S", "VIGIL_SIM_MQTT_USERNAME", "VIGIL_SIM_SEED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VIGIL_SIM_PATIENTS", "7")
    monkeypatch.setenv("VIGIL_SIM_MQTT_PASSWORD", "s3cret")
    monkeypatch.setenv("VIGIL_SIM_SCENARIO", "fever:1")
    monkeypatch.setenv("VIGIL_MQTT_PORT", "41999")

    from_env = settings_from_args([])
    assert (from_env.patients, from_env.mqtt_password, from_env.mqtt.port) == (7, "s3cret", 41999)
    assert from_env.mqtt_username == "vigil-sim"
    assert from_env.duration_s is None

    flags = settings_from_args(
        [
            *("--patients", "3", "--interval", "0.5", "--scenario", "occlusion:rest"),
            *("--duration", "9", "--seed", "5"),
        ]
    )
    assert (flags.patients, flags.interval_s, flags.scenario) == (3, 0.5, "occlusion:rest")
    assert (flags.duration_s, flags.seed) == (9.0, 5)


def test_fleet_registry_registers_every_device_to_its_patient() -> None:
    """fleet_registry gives one care team, N patients, 2N devices, each bound to its patient."""
    registry = fleet_registry(3, "CT-SIM", "oncall@example.org")

    assert registry.care_team.care_team_id == "CT-SIM"
    assert registry.care_team.oncall_email == "oncall@example.org"
    assert [p.patient_id for p in registry.patients] == ["P-0001", "P-0002", "P-0003"]
    assert {p.care_team_id for p in registry.patients} == {"CT-SIM"}
    assert all(p.weight_kg is not None and 12 <= p.weight_kg <= 60 for p in registry.patients)
    assert [(d.device_id, d.kind) for d in registry.devices[:2]] == [
        ("thermo-P-0001", "thermometer"),
        ("pump-P-0001", "pump"),
    ]
    assert len(registry.devices) == 6
    bound = {(b.device_id, b.patient_id) for b in registry.bindings}
    assert ("pump-P-0003", "P-0003") in bound and len(bound) == 6
    assert {b.valid_from for b in registry.bindings} == {REGISTRY_VALID_FROM}
    assert all(b.valid_to is None for b in registry.bindings)


def test_fleet_registry_covers_the_fleet_devices() -> None:
    """Every device the fleet publishes from is in the registry for the same patient count."""
    fleet = Fleet([Scenario.NORMAL] * 4, start=START, interval_s=5.0, seed=1)
    published = {o.device_id for o in drive(fleet, START + timedelta(seconds=10))}
    registered = {d.device_id for d in fleet_registry(4, "CT-SIM", "oncall@example.org").devices}
    assert published == registered


def test_fleet_and_registry_can_number_patients_from_elsewhere() -> None:
    """With first_patient, a second fleet uses other device ids, and its registry matches."""
    fleet = Fleet([Scenario.NORMAL] * 2, start=START, interval_s=5.0, seed=1, first_patient=9001)
    published = {o.device_id for o in drive(fleet, START + timedelta(seconds=10))}
    registry = fleet_registry(2, "CT-SIM", "oncall@example.org", first_patient=9001)
    assert published == {d.device_id for d in registry.devices}
    assert [p.patient_id for p in registry.patients] == ["P-9001", "P-9002"]
