"""The audit log on the real PostgreSQL: append, query, refuse changes, detect tampering.

Tampering happens inside a transaction that is rolled back, and verify runs inside that same
transaction: the broken chain is seen by the test and by no one else, and nothing of it stays.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from vigil.audit import append, list_entries, verify
from vigil.audit.actions import AuditAction
from vigil.runtime import utcnow
from vigil_tools.replay import config_store
from vigil_tools.replay.engine_port import pin

pytestmark = pytest.mark.stack


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def actor() -> str:
    return f"audit-test-{uuid.uuid4().hex[:10]}"


async def superuser(stack_env: dict[str, str]) -> asyncpg.Connection:
    """The stack's superuser, over the Unix socket (the only way pg_hba lets it in)."""
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


async def test_append_links_to_the_head_and_is_listed_by_actor_and_kind(
    conn: asyncpg.Connection, actor: str
) -> None:
    """Two entries from one actor: the second links to the first, and list filters find them
    by actor, by exact action and by dotted prefix."""
    first = await append(conn, actor, AuditAction.ALERT_ACKNOWLEDGED, "alert-1", {"via": "sms"})
    second = await append(
        conn, actor, AuditAction.THRESHOLDS_CHANGED, "P-1", {"old": 38.3, "new": 38.0}
    )
    assert second.seq > first.seq
    mine = await list_entries(conn, actor=actor)
    assert [e.seq for e in mine] == [first.seq, second.seq]
    assert mine[1].details == {"old": 38.3, "new": 38.0}
    acks = await list_entries(conn, actor=actor, kind="alert")
    assert [e.action for e in acks] == ["alert.acknowledged"]
    later = await list_entries(conn, actor=actor, since=second.at)
    assert [e.seq for e in later] == [second.seq]
    assert (await verify(conn)).ok


async def test_concurrent_appends_keep_one_linear_chain(pg_dsn: str, actor: str) -> None:
    """Eight writers appending at once: every entry gets its own number, and the chain
    verifies (the advisory lock serialises them; the insert trigger would refuse a fork)."""

    async def writer(n: int) -> list[int]:
        connection = await asyncpg.connect(pg_dsn)
        try:
            return [
                (await append(connection, actor, "test.concurrent", f"w{n}", {"i": i})).seq
                for i in range(5)
            ]
        finally:
            await connection.close()

    seqs = [s for batch in await asyncio.gather(*(writer(n) for n in range(8))) for s in batch]
    assert len(set(seqs)) == 40
    connection = await asyncpg.connect(pg_dsn)
    try:
        result = await verify(connection)
        assert result.ok, result.as_dict()
        assert result.head_seq is not None and result.head_seq >= max(seqs)
    finally:
        await connection.close()


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET actor = 'x' WHERE seq = $1",
        "DELETE FROM audit_log WHERE seq = $1",
    ],
)
async def test_the_application_role_cannot_change_or_delete_entries(
    conn: asyncpg.Connection, actor: str, statement: str
) -> None:
    """UPDATE and DELETE are refused outright, and TRUNCATE too."""
    entry = await append(conn, actor, "test.refuse", "s")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute(statement, entry.seq)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute("TRUNCATE audit_log")


async def test_an_owner_who_grants_itself_update_is_still_stopped_by_the_trigger(
    conn: asyncpg.Connection, actor: str
) -> None:
    """Re-granting the privilege is not enough: the trigger raises on the UPDATE."""
    entry = await append(conn, actor, "test.refuse", "s")
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute("GRANT UPDATE ON audit_log TO CURRENT_USER")
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await conn.execute("UPDATE audit_log SET actor = 'x' WHERE seq = $1", entry.seq)
    finally:
        await transaction.rollback()


async def test_tampering_after_disabling_the_trigger_is_found_by_verify(
    conn: asyncpg.Connection, actor: str
) -> None:
    """The owner disables the trigger, grants itself UPDATE and edits an entry's details:
    verify, in the same transaction, names exactly that entry."""
    await append(conn, actor, "test.before", "s")
    target = await append(conn, actor, AuditAction.THRESHOLDS_CHANGED, "P-1", {"new": 38.0})
    await append(conn, actor, "test.after", "s")
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
        await conn.execute("GRANT UPDATE ON audit_log TO CURRENT_USER")
        await conn.execute(
            "UPDATE audit_log SET details = '{\"new\": 39.0}' WHERE seq = $1", target.seq
        )
        result = await verify(conn)
        assert not result.ok
        assert result.broken is not None and result.broken.seq == target.seq
        assert "changed" in result.broken.reason
    finally:
        await transaction.rollback()
    assert (await verify(conn)).ok


async def test_tampering_as_superuser_is_found_by_verify(
    stack_env: dict[str, str], conn: asyncpg.Connection, actor: str
) -> None:
    """A superuser can bypass privileges and triggers (replica mode); a rewritten actor and a
    deleted entry are still found, each at its own row."""
    edited = await append(conn, actor, "test.superuser", "edited")
    deleted = await append(conn, actor, "test.superuser", "deleted")
    await append(conn, actor, "test.superuser", "after")
    admin = await superuser(stack_env)
    try:
        for statement, seq, reason in (
            ("UPDATE audit_log SET actor = 'nobody' WHERE seq = $1", edited.seq, "changed"),
            ("DELETE FROM audit_log WHERE seq = $1", deleted.seq, "missing"),
        ):
            transaction = admin.transaction()
            await transaction.start()
            try:
                await admin.execute("SET LOCAL session_replication_role = replica")
                await admin.execute(statement, seq)
                result = await verify(admin)
                assert result.broken is not None, statement
                assert result.broken.seq == seq
                assert reason in result.broken.reason
            finally:
                await transaction.rollback()
    finally:
        await admin.close()


async def test_verify_with_a_recorded_head_detects_a_removed_tail(
    conn: asyncpg.Connection, actor: str
) -> None:
    """Removing the newest entries leaves a valid shorter chain; the head kept from an earlier
    verify exposes it."""
    last = await append(conn, actor, "test.tail", "s")
    admin_tx = conn.transaction()
    await admin_tx.start()
    try:
        await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
        await conn.execute("GRANT DELETE ON audit_log TO CURRENT_USER")
        await conn.execute("DELETE FROM audit_log WHERE seq >= $1", last.seq)
        plain = await verify(conn)
        assert plain.ok  # a shorter chain is still a chain...
        anchored = await verify(conn, expected_head=last.hash)
        assert not anchored.ok  # ...but not the one that was recorded
    finally:
        await admin_tx.rollback()


async def test_config_versions_are_stored_once_and_audited_with_old_and_new_values(
    conn: asyncpg.Connection, actor: str
) -> None:
    """Saving a config makes a version named by its hash; saving it again changes nothing;
    a changed threshold is audited with its old and new value; versions cannot be edited."""
    label = f"test-{actor}"
    base = pin({"config_version": label})
    changed = pin({"config_version": label, "defaults": {"fever_single_c": 38.0}})
    version, new = await config_store.save_config(conn, base, created_by=actor, note="base")
    assert new and version.content_hash == base.content_hash
    _, again = await config_store.save_config(conn, base, created_by=actor)
    assert not again
    await config_store.save_config(conn, changed, created_by=actor, note="lower single")

    loaded = await config_store.load_config(conn, changed.content_hash[:16])
    assert loaded.content_hash == changed.content_hash
    assert loaded.config.defaults.fever_single_c == 38.0
    at_base = await config_store.saved_at(conn, version.created_at)
    assert at_base.content_hash == base.content_hash

    entries = await list_entries(conn, actor=actor, kind=AuditAction.THRESHOLDS_CHANGED)
    assert [e.subject for e in entries] == [base.content_hash, changed.content_hash]
    assert {"path": "defaults.fever_single_c", "old": 38.3, "new": 38.0} in entries[1].details[
        "changes"
    ]
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute(
            "UPDATE rules_config_versions SET created_by = 'x' WHERE content_hash = $1",
            base.content_hash,
        )
    assert utcnow() - version.created_at < timedelta(hours=1)
