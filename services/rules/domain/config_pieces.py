"""A RulesConfig as pieces: what is stored and published so that nothing grows with the fleet.

A config is cut into one piece per care-team protocol (``protocol``, keyed by team), one per
patient profile (``profile``, keyed by patient) and one for everything else (``base``: the
default thresholds and the lateness and outage settings). Each piece is its canonical JSON,
named by the sha256 of that text. A config's *manifest* is the sorted list of its pieces'
(kind, key, digest); its ``content_hash`` is the sha256 of the manifest with its
``config_version`` label on top, so two configs hash alike exactly when every piece and the
label do, whatever order they were built in.

A config loaded from PostgreSQL is labelled ``pg-`` and the first 12 hex digits of the
manifest's digest without the label (``derived_label``): the label follows the content, and one
label names one stored config.

Pure: no I/O. Storing pieces is ``adapters/config_store.py``'s job, loading them back a
replay's (``vigil_tools/replay/config_store.py``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from services.rules.domain.config import PatientProfile, Protocol, RulesConfig

BASE = "base"
PROTOCOL = "protocol"
PROFILE = "profile"
KINDS = (BASE, PROTOCOL, PROFILE)

#: A piece's place in a config: (kind, key); the base piece's key is empty.
PieceKey = tuple[str, str]
BASE_KEY: PieceKey = (BASE, "")

# The fields of a config that are not the label, the protocols or the profiles.
_NOT_BASE = frozenset({"config_version", "protocols", "profiles"})


# What ``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` builds
# on every call, built once: the same text, without a new encoder per piece (a full build
# spells one piece per monitored patient). Safe to share between threads: each ``encode``
# keeps its state to itself.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no spaces, so equal values hash equal."""
    return _CANONICAL.encode(value)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Piece:
    kind: str
    key: str
    text: str
    digest: str

    @property
    def place(self) -> PieceKey:
        return (self.kind, self.key)


def _piece(kind: str, key: str, value: Any) -> Piece:
    text = canonical_json(value)
    return Piece(kind, key, text, digest(text))


def base_piece(config: RulesConfig) -> Piece:
    return _piece(BASE, "", config.model_dump(mode="json", exclude=set(_NOT_BASE)))


def protocol_piece(protocol: Protocol) -> Piece:
    return _piece(PROTOCOL, protocol.care_team_id, protocol.model_dump(mode="json"))


# Written only once recorded, so the pieces of the patients still monitored keep the text (and
# digest) they had before these fields existed.
_COURSE_END_FIELDS = ("infusion_ended_at", "discharged_at")


def profile_piece(profile: PatientProfile) -> Piece:
    body = profile.model_dump(mode="json")
    for name in _COURSE_END_FIELDS:
        if body.get(name) is None:
            body.pop(name, None)
    return _piece(PROFILE, profile.patient_id, body)


def pieces_of(config: RulesConfig) -> dict[PieceKey, Piece]:
    """Every piece of ``config``, by place."""
    pieces = [base_piece(config)]
    pieces += [protocol_piece(p) for p in config.protocols.values()]
    pieces += [profile_piece(p) for p in config.profiles.values()]
    return {piece.place: piece for piece in pieces}


def manifest_body(entries: Mapping[PieceKey, str]) -> str:
    """The manifest without its label: one ``kind key digest`` line per piece, sorted."""
    return "\n".join(sorted(f"{kind} {key} {h}" for (kind, key), h in entries.items()))


def derived_label(entries: Mapping[PieceKey, str], body: str | None = None) -> str:
    """The label a config loaded from PostgreSQL carries: it follows the content. ``body``:
    ``manifest_body(entries)``, when the caller has it."""
    return "pg-" + digest(manifest_body(entries) if body is None else body)[:12]


def content_hash_of(label: str, entries: Mapping[PieceKey, str], body: str | None = None) -> str:
    """The name of a config: sha256 of its label line and its manifest."""
    text = manifest_body(entries) if body is None else body
    return digest(f"config_version {label}\n{text}")


def content_hash(config: RulesConfig) -> str:
    """``content_hash_of`` a config held whole (a file, a replay's what-if)."""
    entries = {place: piece.digest for place, piece in pieces_of(config).items()}
    return content_hash_of(config.config_version, entries)


def config_from_pieces(label: str, pieces: Iterable[tuple[str, str]]) -> RulesConfig:
    """The config whose pieces are ``pieces`` (kind, text) and whose label is ``label``;
    validated (a piece that does not read as its kind raises ``ValueError``)."""
    base: dict[str, Any] | None = None
    protocols: dict[str, Any] = {}
    profiles: dict[str, Any] = {}
    for kind, text in pieces:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(f"a {kind} piece is a JSON object")
        if kind == BASE:
            if base is not None:
                raise ValueError("a config has one base piece")
            base = value
        elif kind == PROTOCOL:
            protocols[str(value["care_team_id"])] = value
        elif kind == PROFILE:
            profiles[str(value["patient_id"])] = value
        else:
            raise ValueError(f"unknown piece kind {kind!r}")
    if base is None:
        raise ValueError("a config needs its base piece")
    return RulesConfig.model_validate(
        {**base, "config_version": label, "protocols": protocols, "profiles": profiles}
    )


@dataclass(frozen=True, slots=True)
class ConfigDelta:
    """What changed from one loaded config to the next: the patients whose profile changed,
    came or went, and the care teams whose protocol did. ``everything``: the base changed (or
    there is no previous config), so every patient's rules may have changed."""

    patients: frozenset[str] = frozenset()
    teams: frozenset[str] = frozenset()
    everything: bool = False

    @property
    def empty(self) -> bool:
        return not (self.everything or self.patients or self.teams)


EVERYTHING = ConfigDelta(everything=True)


def changed_patients(config: RulesConfig, delta: ConfigDelta) -> set[str] | None:
    """The patients of ``config`` whose compiled rules may differ after ``delta`` (a changed
    profile, or a changed protocol of their team); None: all of them."""
    if delta.everything:
        return None
    patients = set(delta.patients)
    if delta.teams:
        patients.update(
            p for p, profile in config.profiles.items() if profile.care_team_id in delta.teams
        )
    return patients
