-- Sealed archive days: a replay's fast path through the readings archive.
--
-- Once a UTC day (of device time) is over, a patient's readings of that day are written once
-- more, together, as one value: the rows in the replay's device order, encoded as the replay
-- reads them (MessagePack arrays of ``ArchivedObservation``'s fields). A replay then reads a
-- patient-day as one value instead of sorting and sending its few hundred rows one by one.
-- The readings tables stay the record; a sealed day is derived from them and is never read
-- once it may differ from them:
--
-- * ``archive_seal.sealed_until``: every day of the patient before it has been sealed. A day
--   with rows then has a row in ``archive_days``; a day without one had no rows.
-- * Any insert, update or delete of a patient's readings before that instant marks the day
--   stale in the same transaction (``body`` NULL, a row made for a day that had none). A
--   replay reads a stale day from the readings tables; the next sealing pass seals it again.
-- * Sealing a patient takes an exclusive advisory lock on the patient; the triggers take the
--   shared one. A seal therefore waits for writers of the patient's rows in flight, reads every
--   committed row, and writers that come during it wait and then see its new ``sealed_until``.
-- * TRUNCATE of a readings table marks every sealed day stale.
--
-- With TimescaleDB the readings tables are hypertables, which take no statement triggers with
-- transition tables; there the archive is compressed by TimescaleDB itself (0001), no triggers
-- are made here, and sealing refuses to run.

CREATE TABLE archive_seal (
    patient_id    text PRIMARY KEY,
    sealed_until  timestamptz NOT NULL
);

CREATE TABLE archive_days (
    patient_id  text NOT NULL,
    day         date NOT NULL,
    -- NULL together: stale, read the day from the readings tables. ``format``: the body's
    -- layout; a replay reads a body of another layout than its own as stale.
    rows        integer,
    format      smallint,
    body        bytea,
    sealed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (patient_id, day),
    CHECK ((rows IS NULL) = (body IS NULL) AND (format IS NULL) = (body IS NULL))
);
-- Stale days are few; a replay asks for them by patient.
CREATE INDEX archive_days_stale ON archive_days (patient_id, day) WHERE body IS NULL;

-- A day's body is ~50 KB of MessagePack for a course's few hundred readings: compressed with
-- lz4 where the server has it (fast to decompress), otherwise stored out of line uncompressed
-- (pglz would cost the server more to decompress than the replay saves).
DO $$
BEGIN
    BEGIN
        ALTER TABLE archive_days ALTER COLUMN body SET COMPRESSION lz4;
    EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
        ALTER TABLE archive_days ALTER COLUMN body SET STORAGE EXTERNAL;
    END;
END
$$;

-- The transition tables are named in static SQL, once per kind of statement, so that the
-- function's plans are cached (the same statements through EXECUTE, planned on every call,
-- cost ingest ~20 % at 50-event batches).
CREATE FUNCTION archive_days_touched() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- The shared advisory lock of every patient touched, in one order (no deadlock between
    -- writers): waits for a seal of the patient in progress, and holds the next one off until
    -- this transaction ends.
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM pg_advisory_xact_lock_shared(1447642945, h)
        FROM (SELECT DISTINCT hashtext(patient_id) AS h FROM new_rows ORDER BY 1) AS touched;
        INSERT INTO archive_days (patient_id, day, rows, body)
        SELECT DISTINCT r.patient_id, (r.device_time AT TIME ZONE 'UTC')::date, NULL::integer,
               NULL::bytea
        FROM new_rows AS r JOIN archive_seal AS s USING (patient_id)
        WHERE r.device_time < s.sealed_until
        ON CONFLICT (patient_id, day) DO UPDATE
        SET rows = NULL, format = NULL, body = NULL, sealed_at = now();
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        PERFORM pg_advisory_xact_lock_shared(1447642945, h)
        FROM (SELECT DISTINCT hashtext(patient_id) AS h FROM old_rows ORDER BY 1) AS touched;
        INSERT INTO archive_days (patient_id, day, rows, body)
        SELECT DISTINCT r.patient_id, (r.device_time AT TIME ZONE 'UTC')::date, NULL::integer,
               NULL::bytea
        FROM old_rows AS r JOIN archive_seal AS s USING (patient_id)
        WHERE r.device_time < s.sealed_until
        ON CONFLICT (patient_id, day) DO UPDATE
        SET rows = NULL, format = NULL, body = NULL, sealed_at = now();
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION archive_days_truncated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE archive_days SET rows = NULL, format = NULL, body = NULL, sealed_at = now()
    WHERE body IS NOT NULL;
    RETURN NULL;
END
$$;

DO $$
DECLARE
    tbl text;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        RETURN;
    END IF;
    FOREACH tbl IN ARRAY ARRAY['temperature_readings', 'pump_status', 'pump_events'] LOOP
        EXECUTE format(
            'CREATE TRIGGER %I AFTER INSERT ON %I REFERENCING NEW TABLE AS new_rows '
            'FOR EACH STATEMENT EXECUTE FUNCTION archive_days_touched()',
            tbl || '_sealed_insert', tbl);
        EXECUTE format(
            'CREATE TRIGGER %I AFTER UPDATE ON %I '
            'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows '
            'FOR EACH STATEMENT EXECUTE FUNCTION archive_days_touched()',
            tbl || '_sealed_update', tbl);
        EXECUTE format(
            'CREATE TRIGGER %I AFTER DELETE ON %I REFERENCING OLD TABLE AS old_rows '
            'FOR EACH STATEMENT EXECUTE FUNCTION archive_days_touched()',
            tbl || '_sealed_delete', tbl);
        EXECUTE format(
            'CREATE TRIGGER %I AFTER TRUNCATE ON %I '
            'FOR EACH STATEMENT EXECUTE FUNCTION archive_days_truncated()',
            tbl || '_sealed_truncate', tbl);
    END LOOP;
END
$$;
