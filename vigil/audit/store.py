"""The audit log in PostgreSQL: append under an advisory lock, query, and walk the chain.

Owns the SQL against ``audit_log``. Appends are serialised by a transaction-scoped advisory lock,
so concurrent writers (notify acknowledging, an operator changing thresholds, a replay finishing)
extend one linear chain; the table's insert trigger refuses any row that does not extend the
newest one, so a writer that skipped the lock fails instead of forking the chain.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from vigil.audit.chain import AuditEntry, ChainBreak, ChainVerifier, canonical_json, seal
from vigil.runtime import utcnow

# "AUDT": one chain appender at a time, across processes.
APPEND_LOCK_KEY = 0x4155_4454

_COLUMNS = "seq, at, actor, action, subject, details::text AS details, prev_hash, hash"


def _entry(row: Any) -> AuditEntry:
    return AuditEntry(
        seq=int(row["seq"]),
        at=row["at"],
        actor=str(row["actor"]),
        action=str(row["action"]),
        subject=str(row["subject"]),
        details=json.loads(row["details"]),
        prev_hash=str(row["prev_hash"]),
        hash=str(row["hash"]),
    )


async def append(
    conn: Any,
    actor: str,
    action: str,
    subject: str,
    details: Mapping[str, Any] | None = None,
    *,
    at: datetime | None = None,
) -> AuditEntry:
    """Append one entry and return it sealed. ``conn`` is an asyncpg connection.

    Inside the caller's transaction the entry commits or rolls back with the action it records
    (the lock is then held until that transaction ends). Call it at READ COMMITTED: an older
    snapshot would not see the newest row, and the insert trigger would refuse the append.
    """
    if not actor or not action:
        raise ValueError("an audit entry needs an actor and an action")
    at = at or utcnow()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
        head_row = await conn.fetchrow("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        # The hash covers details as jsonb gives them back, so verify recomputes the same text
        # whatever jsonb does to number spellings or key order.
        stored = await conn.fetchval("SELECT $1::jsonb::text", canonical_json(dict(details or {})))
        entry = seal(
            (int(head_row["seq"]), str(head_row["hash"])) if head_row else None,
            at=at,
            actor=actor,
            action=action,
            subject=subject,
            details=json.loads(stored),
        )
        await conn.execute(
            """
            INSERT INTO audit_log (seq, at, actor, action, subject, details, prev_hash, hash)
            VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8)
            """,
            entry.seq,
            entry.at,
            entry.actor,
            entry.action,
            entry.subject,
            stored,
            entry.prev_hash,
            entry.hash,
        )
    return entry


async def list_entries(
    conn: Any,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    actor: str | None = None,
    kind: str | None = None,
    subject: str | None = None,
    limit: int | None = 1000,
) -> list[AuditEntry]:
    """Entries in chain order. ``kind`` matches an action exactly or as a dotted prefix."""
    clauses: list[str] = []
    args: list[Any] = []
    if since is not None:
        args.append(since)
        clauses.append(f"at >= ${len(args)}")
    if until is not None:
        args.append(until)
        clauses.append(f"at < ${len(args)}")
    if actor is not None:
        args.append(actor)
        clauses.append(f"actor = ${len(args)}")
    if kind is not None:
        args.append(kind)
        clauses.append(f"(action = ${len(args)} OR action LIKE ${len(args)} || '.%')")
    if subject is not None:
        args.append(subject)
        clauses.append(f"subject = ${len(args)}")
    sql = f"SELECT {_COLUMNS} FROM audit_log WHERE {' AND '.join(clauses) or 'TRUE'} ORDER BY seq"
    if limit is not None:
        args.append(limit)
        sql += f" LIMIT ${len(args)}"
    return [_entry(row) for row in await conn.fetch(sql, *args)]


@dataclass(frozen=True, slots=True)
class VerifyResult:
    rows: int
    head_seq: int | None
    head_hash: str | None
    broken: ChainBreak | None

    @property
    def ok(self) -> bool:
        return self.broken is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "rows_verified": self.rows,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "first_break": self.broken.as_dict() if self.broken else None,
        }


async def verify(
    conn: Any, *, expected_head: str | None = None, batch_size: int = 5000
) -> VerifyResult:
    """Walk the whole chain in one snapshot; report the first row where it breaks.

    Runs in the caller's transaction when there is one (so a test can tamper, verify and roll
    back), otherwise in a read-only repeatable-read snapshot of its own.
    """
    verifier = ChainVerifier()
    if conn.is_in_transaction():
        await _walk(conn, verifier, batch_size)
    else:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await _walk(conn, verifier, batch_size)
    verifier.check_head(expected_head)
    head = verifier.head
    return VerifyResult(
        rows=verifier.rows,
        head_seq=head[0] if head else None,
        head_hash=head[1] if head else None,
        broken=verifier.broken,
    )


async def _walk(conn: Any, verifier: ChainVerifier, batch_size: int) -> None:
    cursor = await conn.cursor(f"SELECT {_COLUMNS} FROM audit_log ORDER BY seq")
    while True:
        rows = await cursor.fetch(batch_size)
        if not rows:
            return
        for row in rows:
            if verifier.feed(_entry(row)) is not None:
                return
