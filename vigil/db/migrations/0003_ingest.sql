-- Ingest: device liveness, when each reading reached the database, and device credential history.

-- Last time each device was heard from, upserted by ingest in the same transaction as the
-- readings it saw. The rules raise "device silent" from last_ingest_time (arrival, the clock a
-- silent device stops moving); last_device_time is the device's own newest timestamp, which a
-- buffered backlog can move backwards relative to arrival, so both are kept.
CREATE TABLE device_last_seen (
    device_id         text PRIMARY KEY,
    patient_id        text NOT NULL,
    last_device_time  timestamptz NOT NULL,
    last_ingest_time  timestamptz NOT NULL,
    last_seq          bigint NOT NULL,
    last_channel      text NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX device_last_seen_ingest ON device_last_seen (last_ingest_time);

-- When the row was written (start of ingest's batch transaction): ingest lag is auditable per
-- reading, and the benchmark measures publish-to-row latency from it. now() is stable, so adding
-- the column does not rewrite existing rows.
ALTER TABLE temperature_readings ADD COLUMN stored_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE pump_status ADD COLUMN stored_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE pump_events ADD COLUMN stored_at timestamptz NOT NULL DEFAULT now();

-- Every credential issued, rotated or revoked for a device, for the audit of who could speak for
-- which device when. The password itself lives only in the broker's hashed password file.
CREATE TABLE device_credential_events (
    device_id  text NOT NULL,
    action     text NOT NULL CHECK (action IN ('issued', 'rotated', 'revoked')),
    at         timestamptz NOT NULL,
    PRIMARY KEY (device_id, at, action)
);
