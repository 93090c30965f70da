-- Notify: a patient's first alert is paged at once and opens a bundling window; alerts arriving
-- inside the window join one follow-up bundle (notify_bundles, 0008) due when the window closes.
-- One row per patient, replaced when a new window opens, so a restart mid-window still knows
-- the window (and its pending follow-up is in notify_bundles). Bundles held under 0008's rule
-- (the first alert waiting) are still paged by the ticker at their due time.

CREATE TABLE notify_bundle_windows (
    patient_id  text PRIMARY KEY,
    opened_at   timestamptz NOT NULL,
    -- opened_at + group_wait at the time it opened; the follow-up of this window is due then.
    closes_at   timestamptz NOT NULL,
    -- The dedup key of the alert that was paged at once and opened the window (audit).
    opened_by   text NOT NULL,
    CHECK (closes_at >= opened_at)
);
