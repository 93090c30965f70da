-- Threshold changes under two sign-offs (services/api/service_layer/thresholds.py): a proposed
-- change to a care team's protocol or a patient's override waits here until a second person
-- approves it (then its overrides are appended to rule_protocols or patient_rule_overrides as
-- the next version, signed off by the approver), rejects it, or its proposer withdraws it.
CREATE TABLE threshold_proposals (
    proposal_id   uuid PRIMARY KEY,
    scope         text NOT NULL CHECK (scope IN ('care_team', 'patient')),
    subject_id    text NOT NULL,
    care_team_id  text NOT NULL REFERENCES care_teams (care_team_id),
    overrides     jsonb NOT NULL CHECK (jsonb_typeof(overrides) = 'object'),
    reason        text,
    based_on      integer NOT NULL CHECK (based_on >= 0),
    proposed_by   text NOT NULL,
    proposed_at   timestamptz NOT NULL,
    decision      text CHECK (decision IN ('approved', 'rejected', 'withdrawn')),
    decided_by    text,
    decided_at    timestamptz,
    version       integer,
    CHECK ((decision IS NULL) = (decided_by IS NULL) AND (decision IS NULL) = (decided_at IS NULL)),
    CHECK ((decision = 'approved') = (version IS NOT NULL))
);
-- At most one pending proposal per protocol or patient.
CREATE UNIQUE INDEX threshold_proposals_pending
    ON threshold_proposals (scope, subject_id) WHERE decision IS NULL;
CREATE INDEX threshold_proposals_team ON threshold_proposals (care_team_id, proposed_at);
