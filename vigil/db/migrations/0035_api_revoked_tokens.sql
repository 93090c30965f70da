-- Tokens ended by logout before they expire: the care-team API refuses them on every replica.
-- A row is kept until the token would have expired anyway; logouts delete the expired rows.
CREATE TABLE api_revoked_tokens (
    token_id    text PRIMARY KEY,
    user_id     text NOT NULL,
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_revoked_tokens_expiry ON api_revoked_tokens (expires_at);
