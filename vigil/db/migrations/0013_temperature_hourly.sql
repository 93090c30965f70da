-- Hourly temperature per patient (readings, min, max, mean of value_c), for plots over a day or
-- a whole 28-day course without sending every reading: 24 rows a day instead of ~288.
--
-- With TimescaleDB it is a continuous aggregate: hours are materialized by a refresh policy
-- (its schedule and look-back are settings applied by the migrator, vigil/db/storage.py), and
-- the hours not yet materialized are computed from the rows at query time (materialized_only =
-- false), so the current hour is always there. On plain PostgreSQL it is a view computing the
-- same columns from the rows. Either way: SELECT ... FROM temperature_hourly WHERE patient_id =
-- $1 AND bucket >= $2 ORDER BY bucket. Hours are UTC hours of device time.
DO $$
DECLARE
    hypertable boolean := false;
BEGIN
    -- Nested, not AND: PL/pgSQL plans a condition as a whole, and on plain PostgreSQL the
    -- timescaledb_information schema does not exist.
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        hypertable := EXISTS (SELECT 1 FROM timescaledb_information.hypertables
                              WHERE hypertable_schema = current_schema()
                                AND hypertable_name = 'temperature_readings');
    END IF;
    IF hypertable THEN
        CREATE MATERIALIZED VIEW temperature_hourly
        WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
        SELECT time_bucket(INTERVAL '1 hour', device_time) AS bucket,
               patient_id,
               count(*) AS readings,
               min(value_c) AS min_c,
               max(value_c) AS max_c,
               avg(value_c) AS mean_c
        FROM temperature_readings
        GROUP BY 1, 2
        WITH NO DATA;
    ELSE
        CREATE VIEW temperature_hourly AS
        SELECT date_bin(INTERVAL '1 hour', device_time, TIMESTAMPTZ '2000-01-03 00:00:00+00')
                   AS bucket,
               patient_id,
               count(*) AS readings,
               min(value_c) AS min_c,
               max(value_c) AS max_c,
               avg(value_c) AS mean_c
        FROM temperature_readings
        GROUP BY 1, 2;
    END IF;
END
$$;
