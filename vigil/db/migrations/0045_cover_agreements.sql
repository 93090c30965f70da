-- Regional cover (docs/regional-cover.md). A centre (organisation) has care teams; a cover
-- agreement lets a covering team act for a covered team during stated hours. Each row is one
-- version of an agreement: proposed by a manager of one side, in force only once a manager of
-- the other side approves it (decision 'approved'); the newest approved version is the one in
-- force, and one with revoked = true ends the agreement. A pending version is a proposal.
CREATE TABLE organisations (
    organisation_id  text PRIMARY KEY,
    name             text NOT NULL
);
ALTER TABLE care_teams ADD COLUMN organisation_id text REFERENCES organisations (organisation_id);

CREATE TABLE cover_agreements (
    agreement_id      uuid NOT NULL,
    version           integer NOT NULL CHECK (version >= 1),
    covering_team_id  text NOT NULL REFERENCES care_teams (care_team_id),
    covered_team_id   text NOT NULL REFERENCES care_teams (care_team_id),
    timezone          text NOT NULL,
    -- The days a window starts on: 0 Monday to 6 Sunday.
    days              smallint[] NOT NULL CHECK (cardinality(days) BETWEEN 1 AND 7
                                                 AND days <@ ARRAY[0, 1, 2, 3, 4, 5, 6]::smallint[]),
    starts            time NOT NULL,
    ends              time NOT NULL,
    -- Local dates on which no window starts.
    exceptions        date[] NOT NULL DEFAULT '{}',
    revoked           boolean NOT NULL DEFAULT false,
    reason            text,
    proposed_by       text NOT NULL,
    proposed_side     text NOT NULL,  -- the team of the proposer: the other side signs off
    proposed_at       timestamptz NOT NULL,
    decision          text CHECK (decision IN ('approved', 'rejected', 'withdrawn')),
    decided_by        text,
    decided_at        timestamptz,
    PRIMARY KEY (agreement_id, version),
    CHECK (covering_team_id <> covered_team_id),
    CHECK (proposed_side IN (covering_team_id, covered_team_id)),
    CHECK ((decision IS NULL) = (decided_by IS NULL) AND (decision IS NULL) = (decided_at IS NULL))
);
-- At most one pending version per agreement.
CREATE UNIQUE INDEX cover_agreements_pending ON cover_agreements (agreement_id)
    WHERE decision IS NULL;
CREATE INDEX cover_agreements_covering ON cover_agreements (covering_team_id);
CREATE INDEX cover_agreements_covered ON cover_agreements (covered_team_id);
