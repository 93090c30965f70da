"""PostgreSQL -> RulesConfig: care-team protocols, patient overrides, profiles (migration 0004).

Reads the newest version of each protocol and override, each patient's care team and weight,
and the newest treatment cycle, and pins them into one ``RulesConfig`` whose ``config_version``
is a digest of its content: the same rows always give the same version, and an alert names it.
A protocol or override that does not validate refuses to load (a signed-off threshold set that
the rules cannot read must be fixed, not skipped).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import asyncpg

from services.rules.domain.config import (
    PatientOverride,
    PatientProfile,
    Protocol,
    RulesConfig,
    Thresholds,
)

_PROTOCOLS = """
SELECT DISTINCT ON (care_team_id) care_team_id, version, overrides
FROM rule_protocols ORDER BY care_team_id, version DESC
"""
_OVERRIDES = """
SELECT DISTINCT ON (patient_id) patient_id, version, overrides
FROM patient_rule_overrides ORDER BY patient_id, version DESC
"""
_PATIENTS = """
SELECT p.patient_id, p.care_team_id, p.weight_kg, c.cycle_start, c.step_up_day
FROM patients p
LEFT JOIN LATERAL (
    SELECT cycle_start, step_up_day FROM patient_cycles pc
    WHERE pc.patient_id = p.patient_id ORDER BY cycle_start DESC LIMIT 1
) c ON true
"""


def _object(value: Any) -> dict[str, Any]:
    # asyncpg returns jsonb as text unless a codec is registered.
    parsed = json.loads(value) if isinstance(value, str) else value
    if not isinstance(parsed, dict):
        raise ValueError("overrides must be a JSON object")
    return parsed


async def load_rules_config(
    conn: asyncpg.Connection, defaults: Thresholds, *, allowed_lateness_s: float
) -> RulesConfig:
    protocols = {
        row["care_team_id"]: Protocol(
            care_team_id=row["care_team_id"],
            version=row["version"],
            overrides=_object(row["overrides"]),
        )
        for row in await conn.fetch(_PROTOCOLS)
    }
    overrides = {
        row["patient_id"]: PatientOverride(
            version=row["version"], overrides=_object(row["overrides"])
        )
        for row in await conn.fetch(_OVERRIDES)
    }
    profiles = {
        row["patient_id"]: PatientProfile(
            patient_id=row["patient_id"],
            care_team_id=row["care_team_id"],
            weight_kg=float(row["weight_kg"]) if row["weight_kg"] is not None else None,
            cycle_start=row["cycle_start"],
            step_up_day=row["step_up_day"] if row["cycle_start"] is not None else 8,
            override=overrides.get(row["patient_id"]),
        )
        for row in await conn.fetch(_PATIENTS)
    }
    draft = RulesConfig(
        defaults=defaults,
        protocols=protocols,
        profiles=profiles,
        allowed_lateness_s=allowed_lateness_s,
    )
    for patient_id in profiles:
        draft.thresholds_for(patient_id)  # raises on an override the rules cannot read
    for protocol in protocols.values():
        Thresholds.model_validate({**defaults.model_dump(), **protocol.overrides})
    digest = hashlib.sha256(draft.model_dump_json().encode()).hexdigest()[:12]
    return draft.model_copy(update={"config_version": f"pg-{digest}"})
