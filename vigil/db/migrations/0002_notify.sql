-- Notify: how each page's recipient was found, and an index to resume undelivered pages.
-- A page routed to the fallback address keeps the reason, so an auditor sees why the care team
-- was not paged directly.

ALTER TABLE pages
    ADD COLUMN route         text NOT NULL DEFAULT 'care_team'
                             CHECK (route IN ('care_team', 'fallback')),
    ADD COLUMN route_detail  text,
    ADD COLUMN updated_at    timestamptz;

-- Later phases of an episode look up its start page by dedup key.
CREATE INDEX pages_dedup_key ON pages (dedup_key);

-- Start-up resumes pages whose delivery never succeeded; they are few, so a partial index.
CREATE INDEX pages_undelivered ON pages (created_at) WHERE status IN ('queued', 'failed');
