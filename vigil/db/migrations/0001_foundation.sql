-- Foundation: who the patients and devices are, what they sent, what was decided and who was told.
-- Every timestamp is timestamptz; device time and ingest time are both kept.

CREATE TABLE care_teams (
    care_team_id  text PRIMARY KEY,
    name          text NOT NULL,
    oncall_email  text NOT NULL,
    timezone      text NOT NULL DEFAULT 'UTC',
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE patients (
    patient_id    text PRIMARY KEY,
    care_team_id  text NOT NULL REFERENCES care_teams (care_team_id),
    weight_kg     numeric(5, 2) CHECK (weight_kg IS NULL OR weight_kg > 0),
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    device_id     text PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('thermometer', 'pump')),
    model         text,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- A device serves one patient over a validity period (pumps are swapped at bag change); a
-- message belongs to the patient the device was bound to at the message's device time.
CREATE TABLE device_bindings (
    device_id     text NOT NULL REFERENCES devices (device_id),
    patient_id    text NOT NULL REFERENCES patients (patient_id),
    valid_from    timestamptz NOT NULL,
    valid_to      timestamptz,
    PRIMARY KEY (device_id, valid_from),
    CHECK (valid_to IS NULL OR valid_to > valid_from)
);

CREATE TABLE temperature_readings (
    device_time     timestamptz NOT NULL,
    ingest_time     timestamptz NOT NULL,
    patient_id      text NOT NULL,
    device_id       text NOT NULL,
    message_id      uuid NOT NULL,
    seq             bigint NOT NULL,
    value_c         double precision NOT NULL,
    original_value  double precision NOT NULL,
    original_unit   text NOT NULL,
    site            text NOT NULL,
    flags           text[] NOT NULL DEFAULT '{}',
    -- Redelivery of the same message is harmless: it hits this key and is skipped.
    UNIQUE (device_id, message_id, device_time)
);
CREATE INDEX temperature_readings_patient_time ON temperature_readings (patient_id, device_time DESC);

CREATE TABLE pump_status (
    device_time          timestamptz NOT NULL,
    ingest_time          timestamptz NOT NULL,
    patient_id           text NOT NULL,
    device_id            text NOT NULL,
    message_id           uuid NOT NULL,
    seq                  bigint NOT NULL,
    state                text NOT NULL,
    rate_ml_h            double precision NOT NULL,
    volume_remaining_ml  double precision NOT NULL,
    bag_volume_ml        double precision,
    battery_pct          double precision,
    flags                text[] NOT NULL DEFAULT '{}',
    UNIQUE (device_id, message_id, device_time)
);
CREATE INDEX pump_status_patient_time ON pump_status (patient_id, device_time DESC);

CREATE TABLE pump_events (
    device_time   timestamptz NOT NULL,
    ingest_time   timestamptz NOT NULL,
    patient_id    text NOT NULL,
    device_id     text NOT NULL,
    message_id    uuid NOT NULL,
    seq           bigint NOT NULL,
    event         text NOT NULL,
    alarm         text,
    detail        text,
    flags         text[] NOT NULL DEFAULT '{}',
    UNIQUE (device_id, message_id, device_time)
);
CREATE INDEX pump_events_patient_time ON pump_events (patient_id, device_time DESC);

-- Each phase of an alert as notify received it (alert_id is per dedup_key and phase).
CREATE TABLE alerts (
    alert_id      uuid PRIMARY KEY,
    dedup_key     text NOT NULL,
    patient_id    text NOT NULL,
    device_id     text NOT NULL,
    kind          text NOT NULL,
    code          text NOT NULL,
    priority      text NOT NULL,
    phase         text NOT NULL,
    state         text NOT NULL,
    title         text NOT NULL,
    device_time   timestamptz NOT NULL,
    ingest_time   timestamptz NOT NULL,
    evidence      jsonb NOT NULL,
    rule_id       text NOT NULL,
    rule_version  text NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alerts_dedup_key ON alerts (dedup_key);
CREATE INDEX alerts_patient_time ON alerts (patient_id, device_time DESC);

CREATE TABLE pages (
    page_id          uuid PRIMARY KEY,
    alert_id         uuid NOT NULL REFERENCES alerts (alert_id),
    dedup_key        text NOT NULL,
    patient_id       text NOT NULL,
    care_team_id     text NOT NULL,
    channel          text NOT NULL,
    recipient        text NOT NULL,
    -- One page per key however often the alert is redelivered: duplicates die here by design.
    idempotency_key  text NOT NULL UNIQUE,
    status           text NOT NULL,
    created_at       timestamptz NOT NULL
);
CREATE INDEX pages_alert ON pages (alert_id);

CREATE TABLE delivery_attempts (
    page_id              uuid NOT NULL REFERENCES pages (page_id),
    attempt              integer NOT NULL CHECK (attempt >= 1),
    channel              text NOT NULL,
    recipient            text NOT NULL,
    status               text NOT NULL,
    at                   timestamptz NOT NULL,
    detail               text,
    provider_message_id  text,
    PRIMARY KEY (page_id, attempt)
);

-- With TimescaleDB the readings tables become hypertables on device time, compressed per
-- patient after a week; on plain PostgreSQL they stay ordinary tables and every query still works.
DO $$
DECLARE
    tbl text;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        FOREACH tbl IN ARRAY ARRAY['temperature_readings', 'pump_status', 'pump_events'] LOOP
            PERFORM create_hypertable(tbl::regclass, 'device_time',
                                      chunk_time_interval => INTERVAL '7 days',
                                      if_not_exists => TRUE);
            EXECUTE format(
                'ALTER TABLE %I SET (timescaledb.compress, '
                'timescaledb.compress_segmentby = ''patient_id, device_id'', '
                'timescaledb.compress_orderby = ''device_time DESC'')', tbl);
            PERFORM add_compression_policy(tbl::regclass, INTERVAL '7 days', if_not_exists => TRUE);
        END LOOP;
    END IF;
END
$$;
