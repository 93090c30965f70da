-- Technical hold (docs/notify.md "Technical alerts: the flapping hold"): a technical alert of
-- MEDIUM, LOW or INFO priority is held for VIGIL_NOTIFY_TECHNICAL_HOLD_S before it is paged, in
-- a notify_bundles row of its own kind (one member, the alert), so the hold survives a restart
-- of notify exactly as a burst follow-up does. Plain PostgreSQL.

ALTER TABLE notify_bundles DROP CONSTRAINT IF EXISTS notify_bundles_kind_check;
ALTER TABLE notify_bundles
    ADD CONSTRAINT notify_bundles_kind_check
    CHECK (kind IN ('burst', 'quiet_digest', 'technical_hold'));
