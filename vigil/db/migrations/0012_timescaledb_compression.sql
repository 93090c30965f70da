-- TimescaleDB: compression of the readings hypertables, on again after 0003.
--
-- 0001 made the readings tables hypertables compressed per patient and device. TimescaleDB
-- refuses 0003's new column with a non-constant default on a table with compression on, so the
-- migrator switches compression off just before 0003 (vigil/db/migrate.py) and it is switched on
-- again here, with the same segments and the message id added to the order: the unique key
-- (device_id, message_id, device_time) is then checked on compressed chunks without
-- decompressing whole segments (TimescaleDB warns about any key column that is in neither).
-- When the policy compresses is a setting (VIGIL_STORAGE_COMPRESS_AFTER_DAYS), applied by the
-- migrator after the files (vigil/db/storage.py), not here.
--
-- On plain PostgreSQL, and for readings tables that are not hypertables (a database that got
-- the extension after 0001 ran), nothing happens.
DO $$
DECLARE
    tbl text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        RETURN;
    END IF;
    FOREACH tbl IN ARRAY ARRAY['temperature_readings', 'pump_status', 'pump_events'] LOOP
        IF EXISTS (SELECT 1 FROM timescaledb_information.hypertables
                   WHERE hypertable_schema = current_schema() AND hypertable_name = tbl
                     AND NOT compression_enabled) THEN
            EXECUTE format(
                'ALTER TABLE %I SET (timescaledb.compress, '
                'timescaledb.compress_segmentby = ''patient_id, device_id'', '
                'timescaledb.compress_orderby = ''device_time DESC, message_id'')', tbl);
        END IF;
    END LOOP;
END
$$;
