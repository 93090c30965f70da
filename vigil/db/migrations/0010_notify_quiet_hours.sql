-- Notify: quiet hours for low-priority alarms. A care team may set a daily window of local
-- wall-clock time (its IANA time zone) during which LOW and INFO alerts are held and paged as
-- one digest per recipient when the window ends. HIGH and MEDIUM are never held.
-- Default: no row, no quiet hours.

CREATE TABLE notify_quiet_hours (
    care_team_id  text PRIMARY KEY REFERENCES care_teams (care_team_id) ON DELETE CASCADE,
    timezone      text NOT NULL,
    starts_local  time NOT NULL,
    ends_local    time NOT NULL,
    updated_at    timestamptz NOT NULL,
    updated_by    text NOT NULL,
    CHECK (starts_local <> ends_local)
);

-- A digest is a bundle of a care team (not of one patient): its held alerts' escalations and
-- its shared pages point at it through the bundle_id columns of 0008, so acknowledging from
-- the digest page, failover and the PagerDuty incident sync work as for a burst bundle.
-- The pending digest is here, not in memory, so a restart during quiet hours still pages it.
ALTER TABLE notify_bundles ALTER COLUMN patient_id DROP NOT NULL;
ALTER TABLE notify_bundles
    ADD COLUMN kind text NOT NULL DEFAULT 'burst' CHECK (kind IN ('burst', 'quiet_digest'));
-- The placement lookup: one pending digest per care team and quiet-hours end.
CREATE INDEX notify_bundles_pending_digest ON notify_bundles (care_team_id, due_at)
    WHERE status = 'pending' AND kind = 'quiet_digest';
