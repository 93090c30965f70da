-- A care team's early-cycle escalation: how a fever in the cytokine-release-syndrome window
-- (cycle day 1-3, the dose step-up day or the day after: the rules' cycle_day evidence) is
-- escalated instead of the team's usual chain. ack_wait_s caps the wait of every step of the
-- usual chain; extra_targets ([{"kind": "person"|"schedule"|"email", "ref": "..."}]) are paged
-- with its first step, at once. No row: the usual chain, unchanged. Read when an alert opens and
-- frozen into escalations.snapshot (key early_cycle), so an edit never changes a running chain.
CREATE TABLE escalation_early_cycle (
    care_team_id   text PRIMARY KEY REFERENCES care_teams (care_team_id),
    ack_wait_s     integer CHECK (ack_wait_s IS NULL OR ack_wait_s >= 1),
    extra_targets  jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(extra_targets) = 'array'),
    updated_at     timestamptz NOT NULL,
    updated_by     text NOT NULL CHECK (updated_by <> ''),
    CHECK (ack_wait_s IS NOT NULL OR extra_targets <> '[]'::jsonb)
);
