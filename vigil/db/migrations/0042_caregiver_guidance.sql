-- First-response guidance a care team gives families (docs/caregivers.md): the words of the
-- first caregiver message for one alarm (a rule's family, e.g. pump_alarm, or one alert code,
-- e.g. pump_occlusion_downstream) in one language. Like a threshold change, a text is first a
-- proposal and takes effect only when a second person approves it; each approval appends the
-- next version, signed off by the approver. Notify reads the newest version.
CREATE TABLE caregiver_guidance (
    care_team_id   text NOT NULL REFERENCES care_teams (care_team_id),
    alarm          text NOT NULL,
    language       text NOT NULL CHECK (language IN ('en', 'fr', 'es')),
    version        integer NOT NULL CHECK (version >= 1),
    text           text NOT NULL CHECK (length(text) BETWEEN 1 AND 200),
    proposed_by    text NOT NULL,
    signed_off_by  text NOT NULL,
    signed_off_at  timestamptz NOT NULL,
    CHECK (proposed_by <> signed_off_by),
    PRIMARY KEY (care_team_id, alarm, language, version)
);

CREATE TABLE caregiver_guidance_proposals (
    proposal_id   uuid PRIMARY KEY,
    care_team_id  text NOT NULL REFERENCES care_teams (care_team_id),
    alarm         text NOT NULL,
    language      text NOT NULL CHECK (language IN ('en', 'fr', 'es')),
    text          text NOT NULL CHECK (length(text) BETWEEN 1 AND 200),
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
-- At most one pending proposal per team, alarm and language.
CREATE UNIQUE INDEX caregiver_guidance_proposals_pending
    ON caregiver_guidance_proposals (care_team_id, alarm, language) WHERE decision IS NULL;
CREATE INDEX caregiver_guidance_proposals_team
    ON caregiver_guidance_proposals (care_team_id, proposed_at);
