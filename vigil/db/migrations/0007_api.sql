-- Care-team API: people who log in, their role, and the care teams whose patients they may see.

CREATE TABLE api_users (
    user_id        text PRIMARY KEY,
    username       text NOT NULL UNIQUE,
    display_name   text NOT NULL,
    password_hash  text NOT NULL,
    role           text NOT NULL CHECK (role IN ('clinician', 'charge_nurse', 'auditor', 'admin')),
    active         boolean NOT NULL DEFAULT true,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Object-level authorization rests on this table: a user sees a patient only when the
-- patient's care team is one of the user's teams.
CREATE TABLE api_user_care_teams (
    user_id       text NOT NULL REFERENCES api_users (user_id) ON DELETE CASCADE,
    care_team_id  text NOT NULL REFERENCES care_teams (care_team_id),
    PRIMARY KEY (user_id, care_team_id)
);
