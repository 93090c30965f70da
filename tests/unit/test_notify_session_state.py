"""Notify's pool gives connections back without asyncpg's session reset
(``services.notify.bootstrap.keep_session``): safe only while no SQL notify sends leaves state
on the session. This reads every string in notify's code (and the audit store it appends
through) and fails on SQL that would: a session-wide ``SET``, ``set_config(..., false)``, a
session advisory lock, ``LISTEN``, a cursor, a prepared statement or a temporary table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = [*sorted((ROOT / "services" / "notify").rglob("*.py")), ROOT / "vigil/audit/store.py"]

_SESSION_STATE = [
    # A SET that opens a statement (not UPDATE ... SET), other than SET LOCAL / TRANSACTION.
    re.compile(r"(?:\A|;)\s*SET\s+(?!LOCAL\b|TRANSACTION\b|CONSTRAINTS\b)", re.I),
    re.compile(r"\bset_config\s*\([^)]*,\s*false\s*\)", re.I),
    re.compile(r"\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\(", re.I),
    re.compile(r"(?:\A|;)\s*(?:UN)?LISTEN\b", re.I),
    re.compile(r"\bDECLARE\s+\w+\s+(?:BINARY\s+)?(?:\w+\s+)*CURSOR\b", re.I),
    re.compile(r"(?:\A|;)\s*PREPARE\s+\w+", re.I),
    re.compile(r"\bCREATE\s+(?:LOCAL\s+|GLOBAL\s+)?TEMP(?:ORARY)?\s+TABLE\b", re.I),
]
_SQL = re.compile(r"\b(?:SELECT|INSERT|UPDATE|DELETE)\b")


def leaves_session_state(sql: str) -> bool:
    return any(pattern.search(sql) for pattern in _SESSION_STATE)


def _strings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # Docstrings and other bare strings are prose, not SQL sent anywhere.
    prose = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    found: list[str] = []
    for node in ast.walk(tree):
        if id(node) in prose:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append(node.value)
        elif isinstance(node, ast.JoinedStr):
            found.append(
                "".join(
                    part.value if isinstance(part, ast.Constant) else "x" for part in node.values
                )
            )
    return found


def test_the_check_catches_session_state_and_passes_what_notify_sends() -> None:
    for sql in (
        "SET synchronous_commit TO off",
        "BEGIN; SET search_path TO x",
        "SELECT set_config('synchronous_commit', 'off', false)",
        "SELECT pg_advisory_lock($1)",
        "SELECT pg_try_advisory_lock(1)",
        "LISTEN pages",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "PREPARE q AS SELECT 1",
        "CREATE TEMP TABLE t (x int)",
    ):
        assert leaves_session_state(sql), sql
    for sql in (
        "SET LOCAL synchronous_commit TO off",
        "SELECT set_config('synchronous_commit', 'off', true)",
        "SELECT pg_advisory_xact_lock($1)",
        "UPDATE pages\nSET status = $2 WHERE page_id = $1",
        "UPDATE pages SET status = 'sent'",
    ):
        assert not leaves_session_state(sql), sql


def test_no_sql_of_notify_leaves_state_on_its_session() -> None:
    offending: list[str] = []
    sql_seen = 0
    for path in SCANNED:
        for text in _strings(path):
            if _SQL.search(text):
                sql_seen += 1
            if leaves_session_state(text):
                offending.append(f"{path.relative_to(ROOT)}: {text.strip()[:80]!r}")
    # The scan read notify's SQL (a positive control: an empty scan would pass anything).
    assert sql_seen > 100
    assert offending == []
