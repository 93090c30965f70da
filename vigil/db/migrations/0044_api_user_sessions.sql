-- When an administrator last ended a login's sessions (`vigil admin users deactivate` and
-- `reset-password`, services/api/service_layer/users.py): a token issued at or before this time
-- is refused, as a logged-out token is. NULL: never.
ALTER TABLE api_users ADD COLUMN sessions_revoked_at timestamptz;
