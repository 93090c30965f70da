-- Regional cover's hand-back (docs/regional-cover.md) looks, on every clock round, for the
-- unresolved escalations filed under a team other than the patient's: the unresolved ones are
-- few beside the history, so they get an index of their own.
CREATE INDEX escalations_unresolved ON escalations (care_team_id)
    WHERE status IN ('open', 'exhausted', 'acknowledged');
