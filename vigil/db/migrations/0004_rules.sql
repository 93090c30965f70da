-- Rules: versioned, signed-off thresholds per care-team protocol and per patient, and the
-- treatment-cycle facts the composite rules need. Append-only: a change is a new version row,
-- so any past configuration can be rebuilt for a replay; the rules use each key's newest version.

CREATE TABLE rule_protocols (
    care_team_id   text NOT NULL REFERENCES care_teams (care_team_id),
    version        integer NOT NULL CHECK (version >= 1),
    -- Field names of services.rules.domain.config.Thresholds; unknown names refuse to load.
    overrides      jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(overrides) = 'object'),
    signed_off_by  text NOT NULL,
    signed_off_at  timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (care_team_id, version)
);

CREATE TABLE patient_rule_overrides (
    patient_id     text NOT NULL REFERENCES patients (patient_id),
    version        integer NOT NULL CHECK (version >= 1),
    overrides      jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(overrides) = 'object'),
    signed_off_by  text NOT NULL,
    signed_off_at  timestamptz NOT NULL,
    reason         text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (patient_id, version)
);

-- One row per blinatumomab cycle; the newest cycle_start is the current one. Day 1 starts at
-- cycle_start; the dose step-up is on step_up_day (8 in the PI schedule; NULL when none).
CREATE TABLE patient_cycles (
    patient_id   text NOT NULL REFERENCES patients (patient_id),
    cycle_start  timestamptz NOT NULL,
    step_up_day  integer CHECK (step_up_day IS NULL OR step_up_day >= 1),
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (patient_id, cycle_start)
);
