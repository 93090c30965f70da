-- Escalation: who to page (people, contact methods, on-call rotations, overrides, policies),
-- the escalation of each alert episode with its frozen policy and its timer, the audit timeline,
-- single-use acknowledgement links and the pipeline heartbeat.

CREATE TABLE people (
    person_id     text PRIMARY KEY,
    name          text NOT NULL,
    care_team_id  text REFERENCES care_teams (care_team_id),
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Tried in rank order: when one channel fails for good the next one is used.
CREATE TABLE contact_methods (
    person_id  text NOT NULL REFERENCES people (person_id) ON DELETE CASCADE,
    rank       integer NOT NULL CHECK (rank >= 0),
    channel    text NOT NULL CHECK (channel IN ('email', 'sms', 'webhook')),
    address    text NOT NULL,
    PRIMARY KEY (person_id, rank)
);
-- An SMS reply names its sender by phone number only.
CREATE INDEX contact_methods_address ON contact_methods (channel, address);

-- A rotation hands off at a wall-clock time in its own time zone, every shift_days days.
CREATE TABLE oncall_schedules (
    schedule_id    text PRIMARY KEY,
    care_team_id   text NOT NULL REFERENCES care_teams (care_team_id),
    name           text NOT NULL,
    timezone       text NOT NULL,
    start_date     date NOT NULL,
    handoff_time   time NOT NULL,
    shift_days     integer NOT NULL CHECK (shift_days >= 1),
    participants   text[] NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE oncall_overrides (
    override_id  uuid PRIMARY KEY,
    schedule_id  text NOT NULL REFERENCES oncall_schedules (schedule_id) ON DELETE CASCADE,
    person_id    text NOT NULL REFERENCES people (person_id),
    starts_at    timestamptz NOT NULL,
    ends_at      timestamptz NOT NULL,
    CHECK (ends_at > starts_at)
);
CREATE INDEX oncall_overrides_schedule ON oncall_overrides (schedule_id, starts_at);

-- steps: [{"wait_s": 300, "targets": [{"kind": "schedule"|"person"|"email", "ref": "..."}]}]
CREATE TABLE escalation_policies (
    policy_id     text PRIMARY KEY,
    care_team_id  text NOT NULL UNIQUE REFERENCES care_teams (care_team_id),
    name          text NOT NULL,
    steps         jsonb NOT NULL,
    repeat_count  integer NOT NULL DEFAULT 0 CHECK (repeat_count >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- One escalation per alert episode (dedup key). snapshot is the policy and its schedules as
-- they were when the alert opened; due_at is the timer a restart picks up again.
CREATE TABLE escalations (
    escalation_id   uuid PRIMARY KEY,
    dedup_key       text NOT NULL UNIQUE,
    alert_id        uuid NOT NULL REFERENCES alerts (alert_id),
    patient_id      text NOT NULL,
    care_team_id    text NOT NULL,
    snapshot        jsonb NOT NULL,
    status          text NOT NULL CHECK (status IN ('open', 'exhausted', 'acknowledged', 'resolved')),
    step_index      integer NOT NULL DEFAULT 0,
    pass_no         integer NOT NULL DEFAULT 0,
    due_at          timestamptz,
    paged           text[] NOT NULL DEFAULT '{}',
    acknowledged_by text,
    acknowledged_at timestamptz,
    resolved_at     timestamptz,
    opened_at       timestamptz NOT NULL,
    snoozed_until   timestamptz
);
-- The ticker's claim query: only open escalations with a timer, earliest first.
CREATE INDEX escalations_due ON escalations (due_at) WHERE status = 'open';

-- The audit timeline; the serial id orders events written by concurrent transactions.
CREATE TABLE escalation_events (
    event_id       bigserial PRIMARY KEY,
    escalation_id  uuid NOT NULL REFERENCES escalations (escalation_id),
    at             timestamptz NOT NULL,
    kind           text NOT NULL,
    detail         jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX escalation_events_escalation ON escalation_events (escalation_id, event_id);

-- Escalation pages live in pages too; these columns drive their delivery from the database.
ALTER TABLE pages
    ADD COLUMN escalation_id    uuid REFERENCES escalations (escalation_id),
    -- person:<id>, email:<address> or fallback:<care team>: whom the page is for, whatever channel.
    ADD COLUMN recipient_ref    text,
    ADD COLUMN contact_rank     integer,
    ADD COLUMN purpose          text,
    ADD COLUMN tries            integer NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at  timestamptz,
    ADD COLUMN provider_ref     text;
CREATE INDEX pages_escalation_due ON pages (next_attempt_at)
    WHERE escalation_id IS NOT NULL AND status IN ('queued', 'failed', 'sending');
CREATE INDEX pages_escalation ON pages (escalation_id);

-- A signed acknowledgement link works once: its digest is kept when it is used.
CREATE TABLE used_ack_tokens (
    token_digest  text PRIMARY KEY,
    used_at       timestamptz NOT NULL
);

-- Last heartbeat seen per pipeline source, and whether its silence is being paged.
CREATE TABLE pipeline_heartbeats (
    source        text PRIMARY KEY,
    last_seen_at  timestamptz NOT NULL,
    silent_since  timestamptz
);
