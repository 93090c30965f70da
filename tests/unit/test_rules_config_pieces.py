"""A rules config in pieces (``config_pieces``): the content hash names the content whatever the
order it was built in, a config rebuilds from its pieces exactly, one patient's change is one
piece, and a reload that changed one patient recompiles and re-arms only that patient, with
the same rules a full compile gives."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from services.rules.domain.config import (
    PatientOverride,
    PatientProfile,
    Protocol,
    RulesCompiler,
    RulesConfig,
)
from services.rules.domain.config_pieces import (
    PROFILE,
    ConfigDelta,
    canonical_json,
    changed_patients,
    config_from_pieces,
    content_hash,
    content_hash_of,
    derived_label,
    pieces_of,
)
from services.rules.domain.engine import RulesEngine
from services.rules.service_layer.config_swap import ConfigWatch, config_record
from tests.support.rules import Home


def fleet(n: int, *, override_for: str | None = None, single_c: float = 38.0) -> RulesConfig:
    profiles = {
        f"P-{i}": PatientProfile(
            patient_id=f"P-{i}",
            care_team_id="team-a" if i % 2 else "team-b",
            weight_kg=20.0 + i,
            cycle_start=datetime(2026, 11, 1, tzinfo=UTC),
        )
        for i in range(n)
    }
    if override_for is not None:
        profiles[override_for] = profiles[override_for].model_copy(
            update={"override": PatientOverride(version=1, overrides={"fever_single_c": single_c})}
        )
    return RulesConfig(
        config_version="v",
        protocols={"team-a": Protocol(care_team_id="team-a", version=1)},
        profiles=profiles,
    )


def test_the_content_hash_follows_the_content_not_the_order() -> None:
    """Profiles inserted in another order hash alike; a changed weight or label does not."""
    config = fleet(20)
    backwards = config.model_copy(update={"profiles": dict(reversed(config.profiles.items()))})
    heavier = config.model_copy(
        update={
            "profiles": {
                **config.profiles,
                "P-3": config.profiles["P-3"].model_copy(update={"weight_kg": 99.0}),
            }
        }
    )
    assert content_hash(backwards) == content_hash(config)
    assert content_hash(heavier) != content_hash(config)
    assert content_hash(config.model_copy(update={"config_version": "w"})) != content_hash(config)


def test_a_config_rebuilds_from_its_pieces_exactly() -> None:
    """Every piece read back (base, protocols, profiles with an override) gives the same config
    and the same content hash."""
    config = fleet(10, override_for="P-4")
    pieces = pieces_of(config)
    rebuilt = config_from_pieces("v", [(p.kind, p.text) for p in pieces.values()])
    assert rebuilt == config
    assert content_hash(rebuilt) == content_hash(config)
    entries = {place: piece.digest for place, piece in pieces.items()}
    assert content_hash_of("v", entries) == content_hash(config)


def test_pieces_are_spelled_as_json_dumps_spells_them() -> None:
    """The stored pieces' digests (and so every recorded version's content hash) depend on the
    spelling: sorted keys, no spaces, non-ASCII as is, floats as repr spells them."""

    def dumps(value: object) -> str:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    value = {"zé": [1.5, 1e16, -0.0, None, True], "a": {"b": "→", "a": 38.25}, "n": 10**20}
    assert canonical_json(value) == dumps(value) == (
        '{"a":{"a":38.25,"b":"→"},"n":100000000000000000000,"zé":[1.5,1e+16,-0.0,null,true]}'
    )
    config = fleet(6, override_for="P-3")
    ended = datetime(2026, 11, 20, 8, 30, tzinfo=UTC)
    config.profiles["P-5"] = config.profiles["P-5"].model_copy(
        update={"infusion_ended_at": ended, "discharged_at": ended}
    )
    pieces = pieces_of(config)
    assert '"discharged_at":"2026-11-20T08:30:00Z"' in pieces[(PROFILE, "P-5")].text
    for piece in pieces.values():
        assert piece.text == dumps(json.loads(piece.text))


def test_a_config_without_a_base_piece_does_not_rebuild() -> None:
    """A piece list that lost its base is refused, not filled with defaults."""
    pieces = pieces_of(fleet(2))
    with pytest.raises(ValueError, match="base"):
        config_from_pieces("v", [(p.kind, p.text) for p in pieces.values() if p.kind != "base"])


def test_one_patients_override_changes_one_piece_and_the_label() -> None:
    """Between two configs that differ in one patient's override, exactly that patient's
    profile piece differs; the derived label changes with it."""
    before = {place: p.digest for place, p in pieces_of(fleet(50)).items()}
    after = {place: p.digest for place, p in pieces_of(fleet(50, override_for="P-7")).items()}
    assert before.keys() == after.keys()
    assert [place for place in before if before[place] != after[place]] == [(PROFILE, "P-7")]
    assert derived_label(before) != derived_label(after)
    assert derived_label(before).startswith("pg-")


def test_the_state_topic_record_does_not_grow_with_the_patients() -> None:
    """The record written to the state topic has the same size for 10 and 5,000 patients
    (only the digits of the count differ), and names the content hash."""
    small, large = fleet(10), fleet(5_000)
    sizes = {len(config_record(small)), len(config_record(large))}
    assert max(sizes) - min(sizes) <= 3
    assert content_hash(large).encode() in config_record(large)
    assert len(config_record(large)) < 4_096


def test_an_incremental_compile_equals_a_full_one() -> None:
    """Keeping an unchanged patient's compiled rules and recompiling the changed one gives what
    compiling every patient from scratch gives; so does a changed protocol of one team."""
    old = fleet(30)
    new = fleet(30, override_for="P-5", single_c=38.1)
    previous = RulesCompiler(old)
    previous.compile_profiles()
    patients = changed_patients(new, ConfigDelta(patients=frozenset({"P-5"})))
    assert patients == {"P-5"}
    kept = RulesCompiler(new)
    kept.keep_from(previous, patients, frozenset())
    kept.compile_patients(patients)
    assert all(kept.rules_for(p) == new.compile_for(p) for p in new.profiles)
    assert kept.rules_for("P-5").fever.single_c == 38.1

    team = new.model_copy(
        update={
            "protocols": {
                "team-a": Protocol(
                    care_team_id="team-a", version=2, overrides={"fever_single_c": 38.1}
                )
            }
        }
    )
    members = changed_patients(team, ConfigDelta(teams=frozenset({"team-a"})))
    assert members == {p for p, prof in team.profiles.items() if prof.care_team_id == "team-a"}
    again = RulesCompiler(team)
    again.keep_from(kept, members, frozenset({"team-a"}))
    again.compile_patients(members)
    assert all(again.rules_for(p) == team.compile_for(p) for p in team.profiles)
    assert changed_patients(team, ConfigDelta(everything=True)) is None


def test_a_reconfigure_limited_to_the_changed_patient_touches_only_them() -> None:
    """The engine re-resolves only the patients named: an untouched patient keeps their rules
    object, the named one gets the new rules and pages under them."""
    start = datetime(2026, 11, 3, tzinfo=UTC)
    old = fleet(4)
    engine = RulesEngine(old)
    homes = {p: Home(p, start) for p in old.profiles}
    for home in homes.values():
        engine.on_telemetry(home.temp(0, 37.0))
    kept = engine._rules["P-1"]
    new = fleet(4, override_for="P-2", single_c=38.1)
    compiler = RulesCompiler(new)
    engine.reconfigure(new, compiler, {"P-2"})
    assert engine._rules["P-1"] is kept
    alerts = engine.on_telemetry(homes["P-2"].temp(5, 38.2))
    assert [a.code for a in alerts] == ["fever_single"]
    assert engine.on_telemetry(homes["P-1"].temp(5, 38.2)) == []


async def test_the_watch_compiles_only_what_the_load_changed() -> None:
    """A load whose delta names one patient: the watch's new compiler carries every other
    patient's compiled rules over (the same objects) and the swap is told that one patient."""
    old = fleet(40)
    current = RulesCompiler(old)
    current.compile_profiles()
    new = fleet(40, override_for="P-9")

    async def load() -> RulesConfig:
        return new.model_copy(update={"config_version": "v2"})

    watch = ConfigWatch(
        load,
        old,
        interval_s=5,
        delta=lambda: ("v", ConfigDelta(patients=frozenset({"P-9"}))),
        compiler=current,
    )
    changed = await watch.check_once()
    assert changed is not None and watch.compiled is not None
    assert watch.compiled.rules_for("P-3") is current.rules_for("P-3")
    assert watch.compiled.rules_for("P-9") == new.compile_for("P-9")
    assert watch.take() is changed
    assert watch.taken_patients == {"P-9"}


async def test_the_watch_compiles_everything_when_the_delta_is_from_another_config() -> None:
    """A delta measured from a config the watch did not compile (a load it refused in between)
    is not trusted: every patient is recompiled and the swap re-arms every patient."""
    old = fleet(10)
    current = RulesCompiler(old)
    current.compile_profiles()
    new = fleet(10, override_for="P-2").model_copy(update={"config_version": "v3"})

    async def load() -> RulesConfig:
        return new

    watch = ConfigWatch(
        load,
        old,
        interval_s=5,
        delta=lambda: ("v-other", ConfigDelta(patients=frozenset({"P-2"}))),
        compiler=current,
    )
    assert await watch.check_once() is new
    assert watch.compiled is not None
    assert watch.compiled.rules_for("P-3") is not current.rules_for("P-3")
    watch.take()
    assert watch.taken_patients is None


def test_a_patient_outside_the_config_is_decided_on_the_defaults() -> None:
    """A reading of a patient with no profile (not monitored) pages on the default 38.3 °C,
    not on a care team's lower level; a profiled patient of a lower protocol pages at 38.0."""
    config = RulesConfig(
        protocols={
            "team-a": Protocol(care_team_id="team-a", version=1, overrides={"fever_single_c": 38.0})
        },
        profiles={"P-in": PatientProfile(patient_id="P-in", care_team_id="team-a")},
    )
    engine = RulesEngine(config)
    start = datetime(2026, 11, 3, tzinfo=UTC) + timedelta(hours=1)
    inside, outside = Home("P-in", start), Home("P-out", start)
    assert [a.code for a in engine.on_telemetry(inside.temp(0, 38.1))] == ["fever_single"]
    assert engine.on_telemetry(outside.temp(0, 38.1)) == []
    assert [a.code for a in engine.on_telemetry(outside.temp(5, 38.4))] == ["fever_single"]
