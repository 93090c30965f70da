-- A delivery attempt is written before its page is handed to the provider, with status
-- 'in_flight', and takes its outcome ('sent', 'failed') when the provider's answer is recorded.
-- An attempt still 'in_flight' when notify stopped becomes 'unknown' when the page is next claimed
-- (the provider may have taken it), never 'cancelled' or not sent. started_at: when the page was
-- claimed to be handed over; at: when the outcome (or the unknown) was recorded. NULL for
-- attempts recorded before this migration and for provider receipts.
-- Plain SQL, no TimescaleDB object: applies the same on plain PostgreSQL.
ALTER TABLE delivery_attempts ADD COLUMN started_at timestamptz;
