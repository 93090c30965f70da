"""The services' least-privilege role on the real PostgreSQL (vigil/db/privileges.py): rows only,
and the audit log insert-only, so its revoked privileges stop the services before its trigger."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from vigil.db.privileges import grant_service_role

pytestmark = pytest.mark.stack


async def superuser() -> asyncpg.Connection:
    """The test stack's superuser over the Unix socket (the only way pg_hba lets it in)."""
    from vigil_tools.stack import StackSettings
    from vigil_tools.stack.credentials import load_secrets
    from vigil_tools.stack.postgres import socket_dir

    settings = StackSettings()
    return await asyncpg.connect(
        host=str(socket_dir(settings)),
        port=settings.pg_port,
        user="postgres",
        password=load_secrets(settings).pg_superuser_password,
        database="vigil",
    )


@pytest.fixture
async def service_role(stack_env: dict[str, str]) -> AsyncIterator[str]:
    """A fresh role with no rights, dropped (with every grant) afterwards."""
    role = f"vigil_svc_{uuid.uuid4().hex[:8]}"
    admin = await superuser()
    try:
        await admin.execute(f"CREATE ROLE {role} NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
        yield role
    finally:
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def test_the_service_role_writes_rows_and_only_appends_to_the_audit_log(
    pg_dsn: str, service_role: str
) -> None:
    granted = await grant_service_role(pg_dsn, service_role)
    assert {
        "audit_log",
        "rules_config_versions",
        "rules_config_pieces",
        "rules_config_manifests",
        "rules_config_manifest_changes",
    } == set(granted["append_only"])
    assert {"alerts", "pages", "escalations", "temperature_readings"} <= set(granted["tables"])
    assert "schema_migrations" in granted["tables"]

    admin = await superuser()
    try:
        async with admin.transaction():
            await admin.execute(f"SET LOCAL ROLE {service_role}")
            assert await admin.fetchval("SELECT count(*) >= 0 FROM alerts")
            assert await admin.fetchval("SELECT count(*) >= 0 FROM audit_log")
            # Refused by privilege (permission denied), not by the append-only trigger.
            for statement in (
                "UPDATE audit_log SET actor = actor",
                "DELETE FROM audit_log",
                "DELETE FROM rules_config_versions",
                "TRUNCATE alerts",
                "CREATE TABLE not_allowed (x int)",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission"):
                    async with admin.transaction():  # a savepoint, rolled back by the error
                        await admin.execute(statement)
            # Rows it may change (inside the outer transaction, rolled back below).
            await admin.execute("UPDATE alerts SET title = title WHERE false")
            await admin.execute("DELETE FROM pages WHERE false")
            raise _Rollback
    except _Rollback:
        pass
    finally:
        await admin.close()


async def test_granting_again_is_idempotent_and_takes_back_extra_rights(
    pg_dsn: str, service_role: str
) -> None:
    """A privilege granted by hand is taken back by the next migrate --grant-to."""
    owner = await asyncpg.connect(pg_dsn)
    try:
        await owner.execute(f"GRANT TRUNCATE, UPDATE ON audit_log TO {service_role}")
        first = await grant_service_role(pg_dsn, service_role)
        second = await grant_service_role(pg_dsn, service_role)
        assert first == second
        privileges = {
            row["privilege_type"]
            for row in await owner.fetch(
                "SELECT privilege_type FROM information_schema.role_table_grants "
                "WHERE grantee = $1 AND table_name = 'audit_log'",
                service_role,
            )
        }
        assert privileges == {"SELECT", "INSERT"}
    finally:
        await owner.close()


async def test_an_unknown_role_is_an_error(pg_dsn: str) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        await grant_service_role(pg_dsn, "no_such_role_here")


class _Rollback(Exception):
    pass
