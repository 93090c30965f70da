"""The hash chain of the audit log, pure: how a row is sealed and how a chain is checked.

A row's hash is ``sha256(prev_hash || canonical JSON of the row)`` where the row is its sequence
number, time, actor, action, subject and details, and the first row follows ``GENESIS``. Changing
any stored field of any row, deleting a row or inserting one in the middle breaks the link at
that row or the next one. No database or clock here; ``vigil.audit.store`` does the I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no whitespace, UTF-8 text, no NaN or infinity."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _instant(at: datetime) -> str:
    if at.tzinfo is None:
        raise ValueError("audit times must be timezone-aware")
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def canonical_row(
    seq: int, at: datetime, actor: str, action: str, subject: str, details: Mapping[str, Any]
) -> str:
    return canonical_json(
        {
            "seq": seq,
            "at": _instant(at),
            "actor": actor,
            "action": action,
            "subject": subject,
            "details": details,
        }
    )


def link_hash(prev_hash: str, canonical: str) -> str:
    return hashlib.sha256((prev_hash + canonical).encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of the audit log."""

    seq: int
    at: datetime
    actor: str
    action: str
    subject: str
    details: Mapping[str, Any]
    prev_hash: str
    hash: str

    def expected_hash(self) -> str:
        row = canonical_row(self.seq, self.at, self.actor, self.action, self.subject, self.details)
        return link_hash(self.prev_hash, row)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": _instant(self.at),
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "details": dict(self.details),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def seal(
    head: tuple[int, str] | None,
    *,
    at: datetime,
    actor: str,
    action: str,
    subject: str,
    details: Mapping[str, Any],
) -> AuditEntry:
    """The entry that extends a chain whose newest row is ``head`` (seq, hash), or starts one."""
    seq, prev_hash = (head[0] + 1, head[1]) if head is not None else (1, GENESIS)
    entry = AuditEntry(seq, at, actor, action, subject, details, prev_hash, "")
    return AuditEntry(seq, at, actor, action, subject, details, prev_hash, entry.expected_hash())


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """The first row where the chain no longer holds, and why."""

    seq: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "reason": self.reason}


class ChainVerifier:
    """Walks a chain row by row (so a long log streams) and stops at the first break."""

    def __init__(self) -> None:
        self.rows = 0
        self.head: tuple[int, str] | None = None
        self.broken: ChainBreak | None = None

    def feed(self, entry: AuditEntry) -> ChainBreak | None:
        if self.broken is not None:
            return self.broken
        expected_seq, expected_prev = (
            (self.head[0] + 1, self.head[1]) if self.head is not None else (1, GENESIS)
        )
        if entry.seq != expected_seq:
            self.broken = ChainBreak(
                expected_seq,
                f"row {expected_seq} is missing (next stored row is {entry.seq})"
                if entry.seq > expected_seq
                else f"row {entry.seq} is out of order (expected {expected_seq})",
            )
        elif entry.prev_hash != expected_prev:
            self.broken = ChainBreak(
                entry.seq, "prev_hash does not match the hash of the row before it"
            )
        elif entry.hash != entry.expected_hash():
            self.broken = ChainBreak(
                entry.seq, "hash does not match the row's content (the row was changed)"
            )
        else:
            self.rows += 1
            self.head = (entry.seq, entry.hash)
        return self.broken

    def check_head(self, expected_head: str | None) -> ChainBreak | None:
        """A truncated tail leaves a valid shorter chain: only a head kept elsewhere shows it."""
        if self.broken is None and expected_head is not None:
            heads = {self.head[1]} if self.head is not None else {GENESIS}
            if expected_head not in heads:
                seq = self.head[0] + 1 if self.head is not None else 1
                self.broken = ChainBreak(
                    seq, "the chain does not end at the expected head (rows were removed?)"
                )
        return self.broken


def verify_entries(entries: Iterable[AuditEntry]) -> ChainBreak | None:
    verifier = ChainVerifier()
    for entry in entries:
        if verifier.feed(entry) is not None:
            break
    return verifier.broken
