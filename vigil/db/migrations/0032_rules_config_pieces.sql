-- The rules config in pieces, so that no row grows with the number of patients: one piece per
-- care-team protocol and per monitored patient's profile, and one for the rest (defaults,
-- lateness), each named by the sha256 of its canonical JSON; a version of the whole config is a
-- manifest naming its parent version and only the pieces that differ from it. A version's
-- content hash is computed from the full list of its pieces (services/rules/domain/
-- config_pieces.py), so a replay that rebuilds it from the chain of changes can check it.
-- Versions stored whole before this (rules_config_versions) stay readable.

CREATE TABLE rules_config_pieces (
    piece_hash  text PRIMARY KEY CHECK (piece_hash ~ '^[0-9a-f]{64}$'),
    kind        text NOT NULL CHECK (kind IN ('base', 'protocol', 'profile')),
    piece_key   text NOT NULL,
    piece_text  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- The stored text is the text that was hashed: a piece cannot drift from its name.
    CHECK (encode(sha256(convert_to(piece_text, 'UTF8')), 'hex') = piece_hash)
);

CREATE TABLE rules_config_manifests (
    content_hash    text PRIMARY KEY CHECK (content_hash ~ '^[0-9a-f]{64}$'),
    config_version  text NOT NULL CHECK (config_version <> ''),
    -- The version this one is stored as changes to (NULL: every piece is listed below).
    parent_hash     text REFERENCES rules_config_manifests (content_hash),
    pieces          integer NOT NULL CHECK (pieces >= 1),
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by      text NOT NULL CHECK (created_by <> ''),
    note            text
);
CREATE INDEX rules_config_manifests_version ON rules_config_manifests (config_version);
CREATE INDEX rules_config_manifests_created ON rules_config_manifests (created_at);

-- What a version changes against its parent: a piece put in place (piece_hash) or taken out
-- (NULL), by kind and key (the care team of a protocol, the patient of a profile).
CREATE TABLE rules_config_manifest_changes (
    content_hash  text NOT NULL REFERENCES rules_config_manifests (content_hash),
    kind          text NOT NULL CHECK (kind IN ('base', 'protocol', 'profile')),
    piece_key     text NOT NULL,
    piece_hash    text REFERENCES rules_config_pieces (piece_hash),
    PRIMARY KEY (content_hash, kind, piece_key)
);

CREATE TRIGGER rules_config_pieces_append_only
    BEFORE UPDATE OR DELETE ON rules_config_pieces
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER rules_config_manifests_append_only
    BEFORE UPDATE OR DELETE ON rules_config_manifests
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER rules_config_manifest_changes_append_only
    BEFORE UPDATE OR DELETE ON rules_config_manifest_changes
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER rules_config_pieces_no_truncate
    BEFORE TRUNCATE ON rules_config_pieces
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER rules_config_manifests_no_truncate
    BEFORE TRUNCATE ON rules_config_manifests
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER rules_config_manifest_changes_no_truncate
    BEFORE TRUNCATE ON rules_config_manifest_changes
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

REVOKE UPDATE, DELETE, TRUNCATE
    ON rules_config_pieces, rules_config_manifests, rules_config_manifest_changes FROM PUBLIC;
REVOKE UPDATE, DELETE, TRUNCATE
    ON rules_config_pieces, rules_config_manifests, rules_config_manifest_changes
    FROM CURRENT_USER;

-- Which patients are monitored (an open binding, or one closed lately) is asked on every
-- reload: bindings by patient.
CREATE INDEX device_bindings_patient ON device_bindings (patient_id, valid_to);
