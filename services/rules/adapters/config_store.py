"""PostgreSQL -> RulesConfig: care-team protocols, patient overrides, profiles (migration 0004),
and the record of every config loaded, in pieces (migration 0032).

Only monitored patients are in the config (``MONITORED``): a patient with a device binding
that is open or closed less than ``unbound_days`` ago (data may arrive that late: ingest
accepts readings up to its clock-behind limit, a week by default, and attributes them by the
binding at device time), or whose newest treatment cycle started less than ``cycle_days`` ago
(an infusion that may still run: 28 days, and up to 7 days of interruption within the same
cycle). A discharged patient (``patients.discharged_at``: migration 0038) stays in the config
whatever those windows say: their profile carries the end of infusion and the discharge, from
which the rules page nothing for them (``PatientRules.stopped``), and the engine may hold their
state and armed timers for as long as it runs (a snapshot restores them), so dropping the
profile would have such a timer judged on the defaults, which know no discharge, and page. A
patient unbound without a discharge costs nothing at start-up or reload once the windows have
passed. A reading of a patient outside the config is decided on the defaults, as for any
patient without a profile.

Reads the newest version of each protocol, and for each monitored patient their care team,
weight, newest cycle, spot-check thermometers and newest override, into one ``RulesConfig``
labelled ``pg-<digest>`` (``config_pieces.derived_label``: the label follows the content). A
protocol or override that does not validate refuses to load (a signed-off threshold set that
the rules cannot read must be fixed, not skipped).

Reloads are incremental (``RulesConfigSource``): a digest of every row, computed on the server,
says whether anything changed; when it did, a digest per patient says who, and only those
patients' rows are read and built again. The config is rebuilt from the previous one with
those profiles replaced, and ``delta`` says which patients and teams changed, so the service
recompiles and re-arms only those.

Every config it loads is recorded, so a replay can pin what was live (``vigil replay
--config-at`` / ``--config-version``): each piece (the base, a protocol, a profile) is stored in
``rules_config_pieces`` under the sha256 of its text, and the version in
``rules_config_manifests`` under its content hash (``config_pieces.content_hash_of``) as
changes against the version recorded before it (``rules_config_manifest_changes``): a change
to one patient writes one piece and one change row, whatever the size of the fleet. The moment
a config became the loaded one is a ``rules_config.loaded`` audit entry (subject: the content
hash). Both writes are idempotent. A failure to record is logged and does not stop the load:
paging never waits on the audit trail, and the next load records it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from services.rules.domain.config import (
    PatientOverride,
    PatientProfile,
    Protocol,
    RulesCompiler,
    RulesConfig,
    Thresholds,
)
from services.rules.domain.config_pieces import (
    BASE_KEY,
    EVERYTHING,
    PROFILE,
    PROTOCOL,
    ConfigDelta,
    Piece,
    PieceKey,
    base_piece,
    canonical_json,
    content_hash_of,
    derived_label,
    manifest_body,
    profile_piece,
    protocol_piece,
)
from services.rules.domain.config_pieces import content_hash as config_content_hash
from vigil.audit import append
from vigil.audit.actions import AuditAction
from vigil.audit.store import APPEND_LOCK_KEY
from vigil.runtime import log_fields

__all__ = [
    "CONFIG_LOADED",
    "LOADED_BY",
    "Manifest",
    "RulesConfigSource",
    "canonical_json",
    "content_hash",
    "load_rules_config",
    "manifest_entries",
    "record_loaded_config",
    "store_manifest",
]

_PROTOCOLS = """
SELECT DISTINCT ON (care_team_id) care_team_id, version, overrides
FROM rule_protocols ORDER BY care_team_id, version DESC
"""

# $1: how long after its binding closed a patient is still monitored (seconds); $2: how long
# after their newest cycle started. A discharged patient is kept for good: the rules must go on
# knowing the discharge for as long as the engine may hold a timer of theirs.
MONITORED = """
SELECT patient_id FROM device_bindings
WHERE valid_to IS NULL OR valid_to > now() - make_interval(secs => $1::float8)
UNION
SELECT patient_id FROM patient_cycles
WHERE cycle_start > now() - make_interval(secs => $2::float8)
UNION
SELECT patient_id FROM patients WHERE discharged_at IS NOT NULL
"""

# Patients fall in 256 buckets by the first byte of the md5 of their id (the same in Python,
# ``bucket_of``), so that a reload compares 256 digests, not one per patient.
_BUCKET = "get_byte(decode(md5({}), 'hex'), 0)"

# One row per monitored patient with everything their profile is made of. $3: only these
# patients (NULL: all); $4: only the patients of these buckets (NULL: all).
_PATIENTS = f"""
SELECT p.patient_id, p.care_team_id, p.weight_kg, c.cycle_start, c.step_up_day, s.spot_checks,
       o.version AS override_version, o.overrides, p.infusion_ended_at, p.discharged_at
FROM patients p
JOIN ({MONITORED}) m ON m.patient_id = p.patient_id
LEFT JOIN LATERAL (
    SELECT cycle_start, step_up_day FROM patient_cycles pc
    WHERE pc.patient_id = p.patient_id ORDER BY cycle_start DESC LIMIT 1
) c ON true
LEFT JOIN LATERAL (
    SELECT array_agg(DISTINCT d.device_id ORDER BY d.device_id) AS spot_checks
    FROM device_bindings b JOIN devices d ON d.device_id = b.device_id
    WHERE b.patient_id = p.patient_id AND d.kind = 'thermometer' AND d.reporting = 'spot_check'
) s ON true
LEFT JOIN LATERAL (
    SELECT version, overrides FROM patient_rule_overrides po
    WHERE po.patient_id = p.patient_id ORDER BY version DESC LIMIT 1
) o ON true
WHERE ($3::text[] IS NULL OR p.patient_id = ANY($3::text[]))
  AND ($4::int[] IS NULL OR {_BUCKET.format("p.patient_id")} = ANY($4::int[]))
"""

# Each patient's row spelled by PostgreSQL and hashed there: any change to a value read above
# changes it (a changed spelling of the same values only costs that patient's rebuild).
_PATIENT_DIGESTS = f"SELECT q.patient_id, md5(row(q.*)::text) AS digest FROM ({_PATIENTS}) q"
_PATIENT_ROWS = f"SELECT q.*, md5(row(q.*)::text) AS digest FROM ({_PATIENTS}) q"

# A digest of every row a config is built from, in one snapshot with the reads that follow:
# one per bucket of patients, and the protocols' as bucket -1.
_FINGERPRINT = f"""
SELECT {_BUCKET.format("d.patient_id")} AS bucket,
       md5(string_agg(d.patient_id || ' ' || d.digest, E'\\n' ORDER BY d.patient_id)) AS digest
FROM ({_PATIENT_DIGESTS}) AS d GROUP BY 1
UNION ALL
SELECT -1, md5(coalesce(string_agg(row(p.*)::text, E'\\n' ORDER BY p.care_team_id), ''))
FROM ({_PROTOCOLS}) AS p
"""


def bucket_of(patient_id: str) -> int:
    """A patient's bucket, as the server computes it (``_BUCKET``)."""
    return hashlib.md5(patient_id.encode()).digest()[0]


log = logging.getLogger("vigil.rules.config")

#: Who the audit log names for a config the rules service loaded.
LOADED_BY = "vigil-rules"
#: The audit action of a config becoming the loaded one (``vigil audit list --kind rules_config``).
CONFIG_LOADED = AuditAction.RULES_CONFIG_LOADED

_LAST_LOADED = """
SELECT subject FROM audit_log WHERE action = $1 ORDER BY seq DESC LIMIT 1
"""

# The pieces of a stored version: its own changes, then its parent's, and so on; the nearest
# change of each piece wins, and a piece taken out (NULL) is not there.
MANIFEST_ENTRIES = """
WITH RECURSIVE chain (content_hash, parent_hash, depth) AS (
    SELECT content_hash, parent_hash, 0 FROM rules_config_manifests WHERE content_hash = $1
    UNION ALL
    SELECT m.content_hash, m.parent_hash, c.depth + 1
    FROM rules_config_manifests m JOIN chain c ON m.content_hash = c.parent_hash
)
SELECT kind, piece_key, piece_hash FROM (
    SELECT DISTINCT ON (ch.kind, ch.piece_key) ch.kind, ch.piece_key, ch.piece_hash
    FROM chain c JOIN rules_config_manifest_changes ch ON ch.content_hash = c.content_hash
    ORDER BY ch.kind, ch.piece_key, c.depth
) AS nearest
WHERE piece_hash IS NOT NULL
"""


def content_hash(config: RulesConfig) -> str:
    """The name a config is recorded under (``config_pieces.content_hash``)."""
    return config_content_hash(config)


@dataclass(frozen=True, slots=True)
class Manifest:
    """A version of the config as stored: its label, its content hash, and the digest of each
    of its pieces by place."""

    label: str
    content_hash: str
    entries: Mapping[PieceKey, str]

    @classmethod
    def of(cls, label: str, entries: Mapping[PieceKey, str]) -> Manifest:
        return cls(label, content_hash_of(label, entries), entries)


async def manifest_entries(conn: asyncpg.Connection, content_hash: str) -> dict[PieceKey, str]:
    """The pieces of a stored version, by place (empty: no such version)."""
    rows = await conn.fetch(MANIFEST_ENTRIES, content_hash)
    return {(row["kind"], row["piece_key"]): row["piece_hash"] for row in rows}


async def store_manifest(
    conn: asyncpg.Connection,
    manifest: Manifest,
    pieces: Mapping[PieceKey, Piece],
    *,
    parent: Manifest | None,
    created_by: str,
    note: str | None,
    known_changes: Mapping[PieceKey, str | None] | None = None,
) -> bool:
    """Store a version as changes against ``parent`` (a stored version; None: every piece),
    inside the caller's transaction; idempotent by content hash. ``pieces``: at least every
    piece not in ``parent``; ``known_changes``: the changes against ``parent``, when the caller
    knows them (else they are found by comparing every entry). Returns whether it was new."""
    exists = await conn.fetchval(
        "SELECT 1 FROM rules_config_manifests WHERE content_hash = $1", manifest.content_hash
    )
    if exists:
        return False
    changes: list[tuple[str, str, str | None]]
    if known_changes is not None and parent is not None:
        changes = [(kind, key, h) for (kind, key), h in known_changes.items()]
    else:
        before: Mapping[PieceKey, str] = parent.entries if parent is not None else {}
        entries = manifest.entries
        changes = [
            (kind, key, h) for (kind, key), h in entries.items() if before.get((kind, key)) != h
        ]
        changes += [(kind, key, None) for (kind, key) in before if (kind, key) not in entries]
    new_pieces = [pieces[(kind, key)] for kind, key, h in changes if h is not None]
    if new_pieces:
        await conn.executemany(
            "INSERT INTO rules_config_pieces (piece_hash, kind, piece_key, piece_text)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (piece_hash) DO NOTHING",
            [(p.digest, p.kind, p.key, p.text) for p in new_pieces],
        )
    await conn.execute(
        "INSERT INTO rules_config_manifests"
        " (content_hash, config_version, parent_hash, pieces, created_by, note)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        manifest.content_hash,
        manifest.label,
        parent.content_hash if parent is not None else None,
        len(manifest.entries),
        created_by,
        note,
    )
    if changes:
        await conn.executemany(
            "INSERT INTO rules_config_manifest_changes (content_hash, kind, piece_key, piece_hash)"
            " VALUES ($1, $2, $3, $4)",
            [(manifest.content_hash, kind, key, h) for kind, key, h in changes],
        )
    return True


async def record_loaded_config(
    conn: asyncpg.Connection,
    manifest: Manifest,
    pieces: Mapping[PieceKey, Piece],
    parent: Manifest | None = None,
    known_changes: Mapping[PieceKey, str | None] | None = None,
) -> bool:
    """Store ``manifest`` (idempotent by content hash, as changes against ``parent``, or when
    that is not given against the config loaded last) and, unless it is already the newest
    loaded one, audit that it is now loaded. Returns whether anything was written.

    The check and the writes run in one transaction under the audit log's append lock, taken
    before the check, so two instances loading the same new config at once write one entry,
    not two. Call it at READ COMMITTED (each statement then sees the other's commit). The
    common case, a reload that finds the config unchanged, is answered by one read without
    the lock, so polling never holds up the audit log's other writers."""
    digest = manifest.content_hash
    if await conn.fetchval(_LAST_LOADED, CONFIG_LOADED) == digest:
        return False
    async with conn.transaction():
        await conn.execute("SET LOCAL jit = off")  # as for the reads (RulesConfigSource._read)
        await conn.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
        last = await conn.fetchval(_LAST_LOADED, CONFIG_LOADED)
        if last == digest:
            return False
        if parent is None:
            known_changes = None
        if parent is None and last is not None:
            entries = await manifest_entries(conn, str(last))
            if entries:  # a version stored whole before migration 0032 has no pieces
                parent = Manifest(label="", content_hash=str(last), entries=entries)
        await store_manifest(
            conn,
            manifest,
            pieces,
            parent=parent,
            created_by=LOADED_BY,
            note=f"loaded by the rules service ({manifest.label})",
            known_changes=known_changes,
        )
        await append(
            conn,
            LOADED_BY,
            CONFIG_LOADED,
            digest,
            {"config_version": manifest.label, "content_hash": digest},
        )
    return True


def _object(value: Any) -> dict[str, Any]:
    # asyncpg returns jsonb as text unless a codec is registered.
    parsed = orjson.loads(value) if isinstance(value, str) else value
    if not isinstance(parsed, dict):
        raise ValueError("overrides must be a JSON object")
    return parsed


@dataclass(slots=True)
class _Built:
    """What a load produced: the config, its pieces and manifest, what changed."""

    config: RulesConfig
    pieces: dict[PieceKey, Piece]
    manifest: Manifest
    delta: ConfigDelta
    row_digests: dict[str, str] = field(default_factory=dict)
    # The digest of each bucket (``_FINGERPRINT``) and the patients in it.
    buckets: dict[int, str] = field(default_factory=dict)
    members: dict[int, frozenset[str]] = field(default_factory=dict)
    # The pieces put in place (a digest) or taken out (None) since the previous build, when
    # there was one: what recording it against that build writes.
    changes: dict[PieceKey, str | None] | None = None


class RulesConfigSource:
    """Loads the rules config from PostgreSQL, rebuilding only what changed.

    ``load`` reads, in one read-only snapshot, a digest of the protocols and of every monitored
    patient's row; while it equals the last load's it returns that load's config (the same
    object: ``skipped`` counts these). Otherwise it reads the protocols (a few rows) and a digest
    per patient, reads the rows of the patients whose digest changed (or who came or went),
    rebuilds those profiles and the protocols that changed, validates them, and records the
    config (``record_loaded_config``) as changes against the one it recorded before. ``delta``
    is what the last new config changed (``ConfigDelta``). A load whose recording failed is
    recorded by the next.

    The first load builds every profile (a second of CPU at 100,000 registered and 10,000
    monitored patients, ``make bench-config-reload``) and runs in a worker thread, as every
    build does: the interpreter hands the event loop the GIL every switch interval (5 ms), so
    alerts go on being decided while it builds."""

    def __init__(
        self,
        defaults: Thresholds,
        *,
        allowed_lateness_s: float,
        arrival_lateness_s: float = 5.0,
        outage_gap_s: float = 60.0,
        resume_grace_s: float = 120.0,
        unbound_days: float = 7.0,
        cycle_days: float = 35.0,
    ) -> None:
        self.defaults = defaults
        self.allowed_lateness_s = allowed_lateness_s
        self.arrival_lateness_s = arrival_lateness_s
        self.outage_gap_s = outage_gap_s
        self.resume_grace_s = resume_grace_s
        self.windows = (unbound_days * 86400.0, cycle_days * 86400.0)
        self.skipped = 0
        # What the last new config changed, and the label of the config it changed from.
        self.delta: ConfigDelta = EVERYTHING
        self.delta_from: str | None = None
        self._fingerprint: dict[int, str] | None = None
        self._built: _Built | None = None
        self._recorded: Manifest | None = None
        self._previous_manifest: Manifest | None = None

    @property
    def manifest(self) -> Manifest | None:
        """The manifest of the config loaded last."""
        return self._built.manifest if self._built is not None else None

    @property
    def pieces(self) -> Mapping[PieceKey, Piece]:
        return self._built.pieces if self._built is not None else {}

    async def load(self, conn: asyncpg.Connection) -> RulesConfig:
        if conn.is_in_transaction():  # the caller's transaction is the snapshot
            fingerprint, built = await self._read(conn)
        else:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                fingerprint, built = await self._read(conn)
        if built is None:
            assert self._built is not None
            self.skipped += 1
            return self._built.config
        if built is not self._built:
            self._previous_manifest = self._built.manifest if self._built else None
            self.delta_from = self._built.config.config_version if self._built else None
            self.delta = built.delta
            self._built = built
        recorded = await self._record(conn, built)
        self._fingerprint = fingerprint if recorded else None
        return built.config

    async def _read(self, conn: asyncpg.Connection) -> tuple[dict[int, str], _Built | None]:
        # These queries are short and run every few seconds: compiling them to machine code
        # (PostgreSQL's JIT, which their estimated cost at 100,000 patients triggers) took
        # longer than running them.
        await conn.execute("SET LOCAL jit = off")
        fingerprint = {
            row["bucket"]: row["digest"]
            for row in await conn.fetch(_FINGERPRINT, *self.windows, None, None)
        }
        previous = self._built
        if previous is not None and fingerprint == self._fingerprint:
            return fingerprint, None
        protocol_rows = await conn.fetch(_PROTOCOLS)
        if previous is None:
            rows = await conn.fetch(_PATIENT_ROWS, *self.windows, None, None)
            built = await asyncio.to_thread(
                self._build, protocol_rows, rows, set(), None, fingerprint, sorted(fingerprint)
            )
            return fingerprint, built
        before = previous.buckets
        buckets = sorted(
            b
            for b in set(fingerprint) | set(before)
            if b >= 0 and fingerprint.get(b) != before.get(b)
        )
        digests = (
            {
                row["patient_id"]: row["digest"]
                for row in await conn.fetch(_PATIENT_DIGESTS, *self.windows, None, buckets)
            }
            if buckets
            else {}
        )
        known = previous.row_digests
        changed = [p for p, d in digests.items() if known.get(p) != d]
        removed = {
            p for b in buckets for p in previous.members.get(b, frozenset()) if p not in digests
        }
        rows = await conn.fetch(_PATIENT_ROWS, *self.windows, changed, None) if changed else []
        built = await asyncio.to_thread(
            self._build, protocol_rows, rows, removed, previous, fingerprint, buckets
        )
        return fingerprint, built

    def _build(
        self,
        protocol_rows: list[Any],
        patient_rows: list[Any],
        removed: set[str],
        previous: _Built | None,
        fingerprint: dict[int, str],
        buckets: list[int],
    ) -> _Built:
        """A config from the protocols, the rows of the patients that changed and the ones that
        went; the rest is ``previous``'s (None: ``patient_rows`` are every patient).
        ``fingerprint``: the digest of each bucket now; ``buckets``: the ones read again."""
        defaults = self.defaults
        protocols = {
            row["care_team_id"]: Protocol(
                care_team_id=row["care_team_id"],
                version=row["version"],
                overrides=_object(row["overrides"]),
            )
            for row in protocol_rows
        }
        profiles = dict(previous.config.profiles) if previous is not None else {}
        row_digests = dict(previous.row_digests) if previous is not None else {}
        pieces = dict(previous.pieces) if previous is not None else {}
        for patient_id in removed:
            profiles.pop(patient_id, None)
            row_digests.pop(patient_id, None)
            pieces.pop((PROFILE, patient_id), None)
        members = dict(previous.members) if previous is not None else {}
        touched: dict[int, set[str]] = {b: set(members.get(b, ())) for b in buckets}
        for patient_id in removed:
            touched[bucket_of(patient_id)].discard(patient_id)
        rebuilt: set[str] = set()
        for row in patient_rows:
            patient_id = row["patient_id"]
            override = (
                PatientOverride(
                    version=row["override_version"], overrides=_object(row["overrides"])
                )
                if row["override_version"] is not None
                else None
            )
            profile = PatientProfile(
                patient_id=patient_id,
                care_team_id=row["care_team_id"],
                weight_kg=float(row["weight_kg"]) if row["weight_kg"] is not None else None,
                cycle_start=row["cycle_start"],
                step_up_day=row["step_up_day"] if row["cycle_start"] is not None else 8,
                spot_check_thermometers=tuple(row["spot_checks"] or ()),
                override=override,
                infusion_ended_at=row["infusion_ended_at"],
                discharged_at=row["discharged_at"],
            )
            profiles[patient_id] = profile
            row_digests[patient_id] = row["digest"]
            touched.setdefault(bucket_of(patient_id), set()).add(patient_id)
            piece = profile_piece(profile)
            if pieces.get(piece.place) != piece:
                pieces[piece.place] = piece
                rebuilt.add(patient_id)
        teams: set[str] = set()
        for place in [p for p in pieces if p[0] == PROTOCOL and p[1] not in protocols]:
            del pieces[place]
            teams.add(place[1])
        for protocol in protocols.values():
            piece = protocol_piece(protocol)
            if pieces.get(piece.place) != piece:
                pieces[piece.place] = piece
                teams.add(protocol.care_team_id)
        draft = RulesConfig.model_construct(
            config_version="",
            defaults=defaults,
            protocols=protocols,
            profiles=profiles,
            allowed_lateness_s=self.allowed_lateness_s,
            arrival_lateness_s=self.arrival_lateness_s,
            outage_gap_s=self.outage_gap_s,
            resume_grace_s=self.resume_grace_s,
        )
        base = base_piece(draft)
        everything = previous is None or pieces.get(BASE_KEY) != base
        pieces[BASE_KEY] = base
        entries = {place: piece.digest for place, piece in pieces.items()}
        body = manifest_body(entries)
        label = derived_label(entries, body)
        config = draft.model_copy(update={"config_version": label})
        delta = (
            EVERYTHING
            if everything
            else ConfigDelta(patients=frozenset(rebuilt | removed), teams=frozenset(teams))
        )
        # Raises on a threshold set the rules cannot read: each changed protocol, and each
        # changed patient's (one resolution per care team for those without an override).
        for team in protocols if everything else teams:
            if team in protocols:
                Thresholds.model_validate({**defaults.model_dump(), **protocols[team].overrides})
        checked = (
            None
            if everything
            else rebuilt | {p for p, profile in profiles.items() if profile.care_team_id in teams}
        )
        RulesCompiler(config).check(checked)
        manifest = Manifest(label, content_hash_of(label, entries, body), entries)
        for b, patients in touched.items():
            members[b] = frozenset(patients)
        changes: dict[PieceKey, str | None] | None = None
        if previous is not None:
            places = {(PROFILE, p) for p in rebuilt | removed}
            places |= {(PROTOCOL, t) for t in teams} | {BASE_KEY}
            old = previous.manifest.entries
            changes = {
                place: entries.get(place)
                for place in places
                if entries.get(place) != old.get(place)
            }
        return _Built(
            config,
            pieces,
            manifest,
            delta,
            row_digests,
            buckets=fingerprint,
            members=members,
            changes=changes,
        )

    async def _record(self, conn: asyncpg.Connection, built: _Built) -> bool:
        """Record ``built`` as loaded unless this source already did; False (and a warning)
        if that failed."""
        manifest = built.manifest
        if self._recorded is not None and self._recorded.content_hash == manifest.content_hash:
            return True
        parent = self._recorded
        previous_manifest = self._previous_manifest
        # The build's own changes hold against the build before it; recorded against another
        # version (a recording failed in between), they are found by comparison.
        known = built.changes if parent is not None and parent is previous_manifest else None
        try:
            await record_loaded_config(conn, manifest, built.pieces, parent, known)
        except (asyncpg.PostgresError, OSError) as error:
            log.warning(
                "rules_config_not_recorded",
                extra=log_fields(config_version=manifest.label, error=repr(error)),
            )
            return False
        self._recorded = manifest
        return True


async def load_rules_config(
    conn: asyncpg.Connection, defaults: Thresholds, *, allowed_lateness_s: float
) -> RulesConfig:
    """Load the config once (a ``RulesConfigSource`` of its own: nothing is remembered)."""
    return await RulesConfigSource(defaults, allowed_lateness_s=allowed_lateness_s).load(conn)
