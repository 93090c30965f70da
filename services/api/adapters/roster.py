"""The roster's facts from PostgreSQL: three queries for all the caller's patients at once, every
one filtered by the caller's care teams in SQL (the newest reading and pump report come from the
``(patient_id, device_time DESC)`` indexes, one index probe each)."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

import asyncpg

from services.api.adapters.repository import _EPISODES_SQL, LAST_SEEN_SQL
from services.api.domain.roster import BoundDevice, OpenAlert, PatientFacts

_PATIENTS_SQL = """
SELECT p.patient_id, p.care_team_id, t.name AS care_team_name, o.name AS care_team_centre,
       t.timezone, p.weight_kg,
       c.cycle_start,
       r.value_c, r.device_time AS temperature_at, r.site,
       s.state, s.device_time AS pump_at, s.rate_ml_h, s.volume_remaining_ml, s.battery_pct,
       CASE WHEN s.state IS DISTINCT FROM 'running' THEN
           (SELECT max(device_time) FROM pump_status x
             WHERE x.patient_id = p.patient_id AND x.state = 'running')
       END AS pump_running_at
FROM patients p
JOIN care_teams t USING (care_team_id)
LEFT JOIN organisations o ON o.organisation_id = t.organisation_id
LEFT JOIN LATERAL (
    SELECT max(cycle_start) AS cycle_start FROM patient_cycles
    WHERE patient_id = p.patient_id AND cycle_start <= $2) c ON true
LEFT JOIN LATERAL (
    SELECT value_c, device_time, site FROM temperature_readings
    WHERE patient_id = p.patient_id ORDER BY device_time DESC LIMIT 1) r ON true
LEFT JOIN LATERAL (
    SELECT state, device_time, rate_ml_h, volume_remaining_ml, battery_pct FROM pump_status
    WHERE patient_id = p.patient_id ORDER BY device_time DESC LIMIT 1) s ON true
WHERE p.care_team_id = ANY($1::text[])
  -- A discharged patient is no longer monitored (``GET /api/discharged`` lists them).
  AND (p.discharged_at IS NULL OR p.discharged_at > $2)
"""

_DEVICES_SQL = f"""
SELECT b.patient_id, b.device_id, d.kind,
       {LAST_SEEN_SQL}
FROM device_bindings b
JOIN devices d USING (device_id)
JOIN patients p ON p.patient_id = b.patient_id AND p.care_team_id = ANY($1::text[])
WHERE b.valid_from <= $2 AND (b.valid_to IS NULL OR b.valid_to > $2)
ORDER BY b.patient_id, d.kind, b.device_id
"""


class RosterQueries:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def facts(self, teams: frozenset[str], now: datetime) -> list[PatientFacts]:
        team_list = list(teams)
        async with self._pool.acquire() as conn:
            patients = await conn.fetch(_PATIENTS_SQL, team_list, now)
            devices = await conn.fetch(_DEVICES_SQL, team_list, now)
            episodes = await conn.fetch(
                f"WITH episodes AS ({_EPISODES_SQL}) SELECT dedup_key, patient_id, title, "
                "priority, opened_at, acknowledged_by FROM episodes WHERE status <> 'resolved'",
                team_list,
            )
        bound: dict[str, list[BoundDevice]] = defaultdict(list)
        for d in devices:
            bound[d["patient_id"]].append(BoundDevice(d["device_id"], d["kind"], d["last_seen"]))
        open_alerts: dict[str, list[OpenAlert]] = defaultdict(list)
        for e in episodes:
            open_alerts[e["patient_id"]].append(
                OpenAlert(
                    e["dedup_key"],
                    e["title"],
                    e["priority"] or "info",
                    e["opened_at"],
                    e["acknowledged_by"],
                )
            )
        return [
            PatientFacts(
                patient_id=p["patient_id"],
                care_team_id=p["care_team_id"],
                care_team_name=p["care_team_name"],
                care_team_centre=p["care_team_centre"],
                timezone=p["timezone"] or "UTC",
                weight_kg=p["weight_kg"],
                cycle_start=p["cycle_start"],
                temperature_c=p["value_c"],
                temperature_at=p["temperature_at"],
                temperature_site=p["site"],
                pump_state=p["state"],
                pump_at=p["pump_at"],
                rate_ml_h=p["rate_ml_h"],
                volume_remaining_ml=p["volume_remaining_ml"],
                battery_pct=p["battery_pct"],
                pump_running_at=p["pump_running_at"],
                devices=tuple(bound.get(p["patient_id"], ())),
                alerts=tuple(open_alerts.get(p["patient_id"], ())),
            )
            for p in patients
        ]
