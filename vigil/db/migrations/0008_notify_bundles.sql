-- Notify: a burst of different alerts for one patient is held for group_wait and paged once,
-- and the round number of an escalation restarted by a snooze.
-- The pending bundle lives here, not in memory, so a restart mid-window still pages it; a bundle
-- that was flushed keeps its members for the audit and for composing later steps' pages.

CREATE TABLE notify_bundles (
    bundle_id     uuid PRIMARY KEY,
    patient_id    text NOT NULL,
    care_team_id  text NOT NULL,
    opened_at     timestamptz NOT NULL,
    -- Fixed when the bundle opens and never moved: no member waits longer than group_wait.
    due_at        timestamptz NOT NULL,
    status        text NOT NULL CHECK (status IN ('pending', 'flushed')),
    flushed_at    timestamptz
);
-- The ticker's claim query and the placement lookup: only pending bundles.
CREATE INDEX notify_bundles_pending_due ON notify_bundles (due_at) WHERE status = 'pending';
CREATE INDEX notify_bundles_pending_patient ON notify_bundles (patient_id) WHERE status = 'pending';

CREATE TABLE notify_bundle_members (
    bundle_id  uuid NOT NULL REFERENCES notify_bundles (bundle_id),
    dedup_key  text NOT NULL,
    alert_id   uuid NOT NULL REFERENCES alerts (alert_id),
    joined_at  timestamptz NOT NULL,
    PRIMARY KEY (bundle_id, dedup_key)
);
-- A later phase of a pending member finds its bundle by dedup key.
CREATE INDEX notify_bundle_members_dedup_key ON notify_bundle_members (dedup_key);

-- Escalations opened from a bundle of two or more alerts, and the pages they share.
ALTER TABLE escalations ADD COLUMN bundle_id uuid REFERENCES notify_bundles (bundle_id);
CREATE INDEX escalations_bundle ON escalations (bundle_id) WHERE bundle_id IS NOT NULL;
ALTER TABLE pages ADD COLUMN bundle_id uuid REFERENCES notify_bundles (bundle_id);
-- The PagerDuty incidents of a bundle are found through its shared pages.
CREATE INDEX pages_bundle ON pages (bundle_id) WHERE bundle_id IS NOT NULL;

-- A snooze restarts the chain from its first step; the round number keeps the pages of the new
-- round from folding into the first round's idempotency keys (which would page nobody).
ALTER TABLE escalations ADD COLUMN round_no integer NOT NULL DEFAULT 0;
