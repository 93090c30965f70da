-- Regional cover's morning summary, e-mailed (docs/regional-cover.md): when a window of cover
-- has ended, notify queues one message per recipient of the covered team, keyed by the
-- agreement and the window's end, so a restart or a second clock round never sends it again.
-- Each row is also the record of its delivery: tries, the provider's last answer, when sent.
CREATE TABLE cover_summary_pages (
    page_id          uuid PRIMARY KEY,
    agreement_id     uuid NOT NULL,
    version          integer NOT NULL,
    window_starts    timestamptz NOT NULL,
    window_ends      timestamptz NOT NULL,
    care_team_id     text NOT NULL,
    channel          text NOT NULL CHECK (channel IN ('email')),
    recipient        text NOT NULL,
    subject          text NOT NULL,
    body             text NOT NULL,
    patients         integer NOT NULL,
    alerts           integer NOT NULL,
    status           text NOT NULL CHECK (status IN ('queued', 'sent', 'failed')),
    tries            integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    detail           text,
    created_at       timestamptz NOT NULL,
    sent_at          timestamptz,
    UNIQUE (agreement_id, window_ends, channel, recipient)
);
CREATE INDEX cover_summary_pages_due ON cover_summary_pages (next_attempt_at)
    WHERE status = 'queued';
