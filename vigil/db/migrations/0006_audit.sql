-- Audit: an append-only, hash-chained log of what people and tools did (acknowledgements,
-- threshold changes, replays run), and the immutable versions of the rules config that replays
-- pin. Both refuse UPDATE and DELETE twice over: the privileges are revoked, and a trigger raises
-- for anyone the privileges do not stop (the owner re-granting itself, a superuser). Someone who
-- bypasses both still cannot hide it: each audit row's hash covers the previous row's hash, so
-- `vigil audit verify` finds the first row that no longer fits.

CREATE TABLE audit_log (
    -- Assigned by the appender under an advisory lock, not by a sequence: no gaps, so a deleted
    -- row shows as a missing number as well as a broken link.
    seq        bigint PRIMARY KEY CHECK (seq >= 1),
    at         timestamptz NOT NULL,
    actor      text NOT NULL CHECK (actor <> ''),
    action     text NOT NULL CHECK (action <> ''),
    subject    text NOT NULL,
    details    jsonb NOT NULL DEFAULT '{}',
    prev_hash  text NOT NULL,
    -- sha256(prev_hash || canonical JSON of the row), hex; computed by vigil.audit.
    hash       text NOT NULL UNIQUE CHECK (hash ~ '^[0-9a-f]{64}$')
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_actor ON audit_log (actor, at);
CREATE INDEX audit_log_action ON audit_log (action, at);

CREATE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

-- The chain stays linear even if an appender forgets the lock: a row must extend the newest.
CREATE FUNCTION audit_log_check_link() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    last_seq   bigint;
    last_hash  text;
BEGIN
    SELECT seq, hash INTO last_seq, last_hash FROM audit_log ORDER BY seq DESC LIMIT 1;
    IF last_seq IS NULL THEN
        IF NEW.seq <> 1 OR NEW.prev_hash <> repeat('0', 64) THEN
            RAISE EXCEPTION 'audit_log: the first row must be seq 1 after the genesis hash';
        END IF;
    ELSIF NEW.seq <> last_seq + 1 OR NEW.prev_hash <> last_hash THEN
        RAISE EXCEPTION 'audit_log: row % does not extend the chain (head is %)', NEW.seq, last_seq;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_log_link
    BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_check_link();

-- Every version of the rules config (default protocol and per-patient thresholds) ever saved,
-- keyed by the sha256 of its canonical JSON, so a replay can pin any of them by hash or by date.
CREATE TABLE rules_config_versions (
    content_hash  text PRIMARY KEY CHECK (content_hash ~ '^[0-9a-f]{64}$'),
    config_text   text NOT NULL,
    config        jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    text NOT NULL CHECK (created_by <> ''),
    note          text,
    -- The stored text is the text that was hashed: a version cannot drift from its name.
    CHECK (encode(sha256(convert_to(config_text, 'UTF8')), 'hex') = content_hash)
);
CREATE INDEX rules_config_versions_created ON rules_config_versions (created_at);

CREATE TRIGGER rules_config_versions_append_only
    BEFORE UPDATE OR DELETE ON rules_config_versions
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER rules_config_versions_no_truncate
    BEFORE TRUNCATE ON rules_config_versions
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

REVOKE UPDATE, DELETE, TRUNCATE ON audit_log, rules_config_versions FROM PUBLIC;
REVOKE UPDATE, DELETE, TRUNCATE ON audit_log, rules_config_versions FROM CURRENT_USER;
