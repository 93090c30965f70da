-- When Vigil was not watching: each silence of a pipeline heartbeat source, from the last
-- heartbeat seen before it to the first heartbeat back (docs/notify.md, "After an outage").
-- Plain tables: no TimescaleDB object, so this applies on plain PostgreSQL too.
CREATE TABLE pipeline_outages (
    outage_id       uuid PRIMARY KEY,
    source          text NOT NULL,
    -- device time of the last heartbeat before the silence
    started_at      timestamptz NOT NULL,
    -- device time of the first heartbeat back; NULL while the outage lasts
    ended_at        timestamptz,
    -- notify's clock: when the silence was noticed, and when the heartbeat was seen back
    detected_at     timestamptz NOT NULL,
    recovered_at    timestamptz,
    -- the care teams' summaries are composed at this time (after the rules' resume grace)
    summary_due_at  timestamptz,
    summarised_at   timestamptz,
    UNIQUE (source, started_at),
    CHECK (ended_at IS NULL OR ended_at >= started_at)
);
CREATE INDEX pipeline_outages_due ON pipeline_outages (summary_due_at)
    WHERE summarised_at IS NULL AND summary_due_at IS NOT NULL;

-- A start phase whose device time lies inside an outage just ended, held briefly for its end
-- (MEDIUM and lower only; HIGH is never held): an end arriving in time folds it into the
-- summary; otherwise it is paged when released.
CREATE TABLE pipeline_outage_held (
    dedup_key    text PRIMARY KEY,
    outage_id    uuid NOT NULL REFERENCES pipeline_outages (outage_id),
    alert        jsonb NOT NULL,
    held_at      timestamptz NOT NULL,
    due_at       timestamptz NOT NULL,
    released_at  timestamptz,
    -- 'paged' (still open when released) or 'folded' (its end arrived while held)
    outcome      text CHECK (outcome IN ('paged', 'folded'))
);
CREATE INDEX pipeline_outage_held_due ON pipeline_outage_held (due_at) WHERE released_at IS NULL;

-- One summary per care team and outage, one row per recipient and channel.
CREATE TABLE pipeline_outage_pages (
    page_id          uuid PRIMARY KEY,
    outage_id        uuid NOT NULL REFERENCES pipeline_outages (outage_id),
    care_team_id     text NOT NULL,
    recipient_ref    text NOT NULL,
    channel          text NOT NULL CHECK (channel IN ('email', 'sms', 'webhook')),
    recipient        text NOT NULL,
    subject          text NOT NULL,
    body             text NOT NULL,
    short_text       text NOT NULL,
    status           text NOT NULL CHECK (status IN ('queued', 'sent', 'failed')),
    tries            integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    detail           text,
    created_at       timestamptz NOT NULL,
    sent_at          timestamptz,
    UNIQUE (outage_id, care_team_id, channel, recipient)
);
CREATE INDEX pipeline_outage_pages_due ON pipeline_outage_pages (next_attempt_at)
    WHERE status = 'queued';
