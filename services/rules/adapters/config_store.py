"""PostgreSQL -> RulesConfig: care-team protocols, patient overrides, profiles (migration 0004).

Reads the newest version of each protocol and override, each patient's care team and weight,
and the newest treatment cycle, and pins them into one ``RulesConfig`` whose ``config_version``
is a digest of its content: the same rows always give the same version, and an alert names it.
A protocol or override that does not validate refuses to load (a signed-off threshold set that
the rules cannot read must be fixed, not skipped).

Every config it loads is also recorded, so a replay can pin what was live (``vigil replay
--config-at`` / ``--config-version``): the config is stored in ``rules_config_versions`` under the
sha256 of its canonical JSON (``content_hash``; the row's text is the hashed text, and its
``config_version`` label is inside it, so an alert's label finds the row), and the moment it
became the loaded config is a ``rules_config.loaded`` entry in the audit log. Both writes are
idempotent: loading unchanged rows again writes nothing, and content already stored is not
stored twice (a config that comes back after another one gets a new audit entry, not a new
row). A failure to record is logged and does not stop the load: paging never waits on the
audit trail, and the next load records it.

The rules service reloads every few seconds and the config rarely changes, so a reload first
asks the server for a digest of the rows a config is made of (``RulesConfigSource``); when it is
the last load's, nothing is read or built. Building a config costs about 100 ms of CPU at
4,600 patients and 260-290 ms at 9,600 (``make bench-config-reload``; most of it building and
serialising the profiles), spent in a worker thread so that the event loop goes on deciding
alerts; the digest is one query computed on the server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any

import asyncpg

from services.rules.domain.config import (
    PatientOverride,
    PatientProfile,
    Protocol,
    RulesCompiler,
    RulesConfig,
    Thresholds,
)
from vigil.audit import append
from vigil.audit.actions import AuditAction
from vigil.audit.store import APPEND_LOCK_KEY
from vigil.runtime import log_fields

_PROTOCOLS = """
SELECT DISTINCT ON (care_team_id) care_team_id, version, overrides
FROM rule_protocols ORDER BY care_team_id, version DESC
"""
_OVERRIDES = """
SELECT DISTINCT ON (patient_id) patient_id, version, overrides
FROM patient_rule_overrides ORDER BY patient_id, version DESC
"""
_PATIENTS = """
SELECT p.patient_id, p.care_team_id, p.weight_kg, c.cycle_start, c.step_up_day, s.spot_checks
FROM patients p
LEFT JOIN LATERAL (
    SELECT cycle_start, step_up_day FROM patient_cycles pc
    WHERE pc.patient_id = p.patient_id ORDER BY cycle_start DESC LIMIT 1
) c ON true
LEFT JOIN LATERAL (
    SELECT array_agg(DISTINCT d.device_id ORDER BY d.device_id) AS spot_checks
    FROM device_bindings b JOIN devices d ON d.device_id = b.device_id
    WHERE b.patient_id = p.patient_id AND d.kind = 'thermometer' AND d.reporting = 'spot_check'
) s ON true
"""


log = logging.getLogger("vigil.rules.config")

#: Who the audit log names for a config the rules service loaded.
LOADED_BY = "vigil-rules"
#: The audit action of a config becoming the loaded one (``vigil audit list --kind rules_config``).
CONFIG_LOADED = AuditAction.RULES_CONFIG_LOADED

_LAST_LOADED = """
SELECT subject FROM audit_log WHERE action = $1 ORDER BY seq DESC LIMIT 1
"""
_STORE = """
INSERT INTO rules_config_versions (content_hash, config_text, config, created_by, note)
VALUES ($1, $2::text, $2::text::jsonb, $3, $4)
ON CONFLICT (content_hash) DO NOTHING
"""


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no spaces, so equal configs hash equal."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def config_text(config: RulesConfig) -> str:
    """The text a config is stored and hashed as: canonical JSON of its JSON form."""
    return canonical_json(config.model_dump(mode="json"))


def content_hash(config: RulesConfig) -> str:
    """The name of a config in ``rules_config_versions``: sha256 of ``config_text``."""
    return hashlib.sha256(config_text(config).encode()).hexdigest()


async def record_loaded_config(
    conn: asyncpg.Connection, config: RulesConfig, text: str | None = None
) -> bool:
    """Store ``config`` (idempotent by content hash) and, unless it is already the newest
    loaded one, audit that it is now loaded. Returns whether anything was written. ``text``:
    ``config_text(config)``, when the caller already has it.

    The check and the writes run in one transaction under the audit log's append lock, taken
    before the check, so two instances loading the same new config at once write one entry,
    not two. Call it at READ COMMITTED (each statement then sees the other's commit). The
    common case, a reload that finds the config unchanged, is answered by one read without
    the lock, so polling never holds up the audit log's other writers."""
    if text is None:
        text = config_text(config)
    digest = hashlib.sha256(text.encode()).hexdigest()
    if await conn.fetchval(_LAST_LOADED, CONFIG_LOADED) == digest:
        return False
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
        if await conn.fetchval(_LAST_LOADED, CONFIG_LOADED) == digest:
            return False
        await conn.execute(
            _STORE,
            digest,
            text,
            LOADED_BY,
            f"loaded by the rules service ({config.config_version})",
        )
        await append(
            conn,
            LOADED_BY,
            CONFIG_LOADED,
            digest,
            {"config_version": config.config_version, "content_hash": digest},
        )
    return True


def _object(value: Any) -> dict[str, Any]:
    # asyncpg returns jsonb as text unless a codec is registered.
    parsed = json.loads(value) if isinstance(value, str) else value
    if not isinstance(parsed, dict):
        raise ValueError("overrides must be a JSON object")
    return parsed


# A digest of every row a config is built from, in one snapshot with the reads that follow.
# Each row is spelled by PostgreSQL's own text of the row, so any change to a value read above
# changes the digest (a changed spelling of the same values only costs one full load).
_FINGERPRINT = f"""
SELECT encode(sha256(convert_to(coalesce(string_agg(line, E'\\n' ORDER BY line), ''), 'UTF8')),
              'hex')
FROM (
    SELECT 'protocol ' || row(p.*)::text AS line FROM ({_PROTOCOLS}) AS p
    UNION ALL
    SELECT 'override ' || row(o.*)::text FROM ({_OVERRIDES}) AS o
    UNION ALL
    SELECT 'patient ' || row(q.*)::text FROM ({_PATIENTS}) AS q
) AS config_rows
"""


class RulesConfigSource:
    """Loads the rules config from PostgreSQL, and does not build it again while nothing it is
    made of has changed.

    ``load`` reads, in one read-only snapshot, a digest of the protocols, overrides, patients
    and cycles a config is made of, and when it equals the last load's returns that load's
    config (the same object: ``skipped`` counts these). Otherwise it reads the rows, builds and
    validates the config, and records it (``record_loaded_config``). A load whose recording
    failed is not remembered, so the next load builds and records again.

    The build (and the config's canonical text, for the record) runs in a worker thread: it is
    hundreds of milliseconds of CPU at thousands of patients, and on the event loop it would
    hold up every alert that long. In a thread the interpreter hands the loop the GIL every
    switch interval (5 ms), so alerts go on being decided while it builds."""

    def __init__(
        self,
        defaults: Thresholds,
        *,
        allowed_lateness_s: float,
        arrival_lateness_s: float = 5.0,
        outage_gap_s: float = 60.0,
        resume_grace_s: float = 120.0,
    ) -> None:
        self.defaults = defaults
        self.allowed_lateness_s = allowed_lateness_s
        self.arrival_lateness_s = arrival_lateness_s
        self.outage_gap_s = outage_gap_s
        self.resume_grace_s = resume_grace_s
        self.skipped = 0
        self._fingerprint: str | None = None
        self._config: RulesConfig | None = None

    async def load(self, conn: asyncpg.Connection) -> RulesConfig:
        if conn.is_in_transaction():  # the caller's transaction is the snapshot
            fingerprint, rows = await self._read(conn)
        else:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                fingerprint, rows = await self._read(conn)
        if rows is None:
            assert self._config is not None
            self.skipped += 1
            return self._config
        config, text = await asyncio.to_thread(self._build_with_text, *rows)
        recorded = await _record(conn, config, text)
        self._fingerprint, self._config = (fingerprint, config) if recorded else (None, None)
        return config

    async def _read(
        self, conn: asyncpg.Connection
    ) -> tuple[str, tuple[list[Any], list[Any], list[Any]] | None]:
        fingerprint = str(await conn.fetchval(_FINGERPRINT))
        if self._config is not None and fingerprint == self._fingerprint:
            return fingerprint, None
        rows = (
            await conn.fetch(_PROTOCOLS),
            await conn.fetch(_OVERRIDES),
            await conn.fetch(_PATIENTS),
        )
        return fingerprint, rows

    def _build_with_text(
        self, protocol_rows: list[Any], override_rows: list[Any], patient_rows: list[Any]
    ) -> tuple[RulesConfig, str]:
        config = self._build(protocol_rows, override_rows, patient_rows)
        return config, config_text(config)

    def _build(
        self, protocol_rows: list[Any], override_rows: list[Any], patient_rows: list[Any]
    ) -> RulesConfig:
        defaults = self.defaults
        protocols = {
            row["care_team_id"]: Protocol(
                care_team_id=row["care_team_id"],
                version=row["version"],
                overrides=_object(row["overrides"]),
            )
            for row in protocol_rows
        }
        overrides = {
            row["patient_id"]: PatientOverride(
                version=row["version"], overrides=_object(row["overrides"])
            )
            for row in override_rows
        }
        profiles = {
            row["patient_id"]: PatientProfile(
                patient_id=row["patient_id"],
                care_team_id=row["care_team_id"],
                weight_kg=float(row["weight_kg"]) if row["weight_kg"] is not None else None,
                cycle_start=row["cycle_start"],
                step_up_day=row["step_up_day"] if row["cycle_start"] is not None else 8,
                spot_check_thermometers=tuple(row["spot_checks"] or ()),
                override=overrides.get(row["patient_id"]),
            )
            for row in patient_rows
        }
        draft = RulesConfig(
            defaults=defaults,
            protocols=protocols,
            profiles=profiles,
            allowed_lateness_s=self.allowed_lateness_s,
            arrival_lateness_s=self.arrival_lateness_s,
            outage_gap_s=self.outage_gap_s,
            resume_grace_s=self.resume_grace_s,
        )
        # Raises on an override the rules cannot read: each distinct threshold set is resolved
        # once (a care team's patients without an override all resolve to the team's).
        RulesCompiler(draft).check()
        for protocol in protocols.values():
            Thresholds.model_validate({**defaults.model_dump(), **protocol.overrides})
        digest = hashlib.sha256(draft.model_dump_json().encode()).hexdigest()[:12]
        return draft.model_copy(update={"config_version": f"pg-{digest}"})


async def _record(conn: asyncpg.Connection, config: RulesConfig, text: str) -> bool:
    """Record ``config`` as loaded; False (and a warning) if that failed."""
    try:
        await record_loaded_config(conn, config, text)
    except (asyncpg.PostgresError, OSError) as error:
        log.warning(
            "rules_config_not_recorded",
            extra=log_fields(config_version=config.config_version, error=repr(error)),
        )
        return False
    return True


async def load_rules_config(
    conn: asyncpg.Connection, defaults: Thresholds, *, allowed_lateness_s: float
) -> RulesConfig:
    """Load the config once (a ``RulesConfigSource`` of its own: nothing is remembered)."""
    return await RulesConfigSource(defaults, allowed_lateness_s=allowed_lateness_s).load(conn)
