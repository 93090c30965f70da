-- Bulk FHIR export jobs (services/api/service_layer/fhir_export.py), so that any API replica
-- answers a job's status and file URLs, and a job whose replica stopped is reported failed
-- rather than lost. A running job's replica touches alive_at while it works; a running job not
-- touched for a minute is failed by whichever replica reads it. Plain tables on PostgreSQL
-- and TimescaleDB alike.
CREATE TABLE fhir_export_jobs (
    job_id            text PRIMARY KEY,
    owner             text NOT NULL,
    -- The one patient of a patient/*.read token that started the job (NULL: user/*.read).
    scope_patient     text,
    request_url       text NOT NULL,
    transaction_time  timestamptz NOT NULL,
    patient_ids       text[] NOT NULL,
    types             text[] NOT NULL,
    status            text NOT NULL CHECK (status IN ('running', 'complete', 'failed')),
    done_patients     integer NOT NULL DEFAULT 0,
    counts            jsonb NOT NULL DEFAULT '{}'::jsonb,
    error             text,
    alive_at          timestamptz NOT NULL,
    finished_at       timestamptz
);
CREATE INDEX fhir_export_jobs_owner_status ON fhir_export_jobs (owner, status);

-- Each NDJSON file in pieces (in order), stored uncompressed: NDJSON of one course is tens of
-- megabytes, and compressing it on every export would cost more than the bytes it saves.
CREATE TABLE fhir_export_files (
    job_id         text NOT NULL REFERENCES fhir_export_jobs (job_id) ON DELETE CASCADE,
    resource_type  text NOT NULL,
    piece          integer NOT NULL,
    content        bytea NOT NULL,
    PRIMARY KEY (job_id, resource_type, piece)
);
ALTER TABLE fhir_export_files ALTER COLUMN content SET STORAGE EXTERNAL;
