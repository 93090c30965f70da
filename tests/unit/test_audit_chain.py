"""The audit hash chain, pure: sealing rows and finding the first one that no longer fits."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from vigil.audit.chain import (
    GENESIS,
    AuditEntry,
    ChainVerifier,
    canonical_row,
    seal,
    verify_entries,
)

T0 = datetime(2026, 3, 1, 9, tzinfo=UTC)


def chain(length: int) -> list[AuditEntry]:
    entries: list[AuditEntry] = []
    head: tuple[int, str] | None = None
    for n in range(length):
        entry = seal(
            head,
            at=T0 + timedelta(minutes=n),
            actor=f"nurse-{n % 3}",
            action="alert.acknowledged",
            subject=f"alert-{n}",
            details={"n": n, "note": "rappel à 03:00", "values": [38.3, 38.0]},
        )
        entries.append(entry)
        head = (entry.seq, entry.hash)
    return entries


def test_each_hash_is_sha256_of_the_previous_hash_and_the_canonical_row() -> None:
    """The first row follows the genesis hash; each hash is computed exactly as documented."""
    first, second = chain(2)
    assert first.seq == 1 and first.prev_hash == GENESIS
    row = canonical_row(1, first.at, first.actor, first.action, first.subject, first.details)
    assert first.hash == hashlib.sha256((GENESIS + row).encode()).hexdigest()
    assert second.prev_hash == first.hash and second.seq == 2
    assert '"details":{"n":0,"note":"rappel à 03:00","values":[38.3,38.0]}' in row


def test_an_intact_chain_verifies() -> None:
    """Fifty honest rows: no break, and the verifier ends at the last row's hash."""
    entries = chain(50)
    verifier = ChainVerifier()
    for entry in entries:
        assert verifier.feed(entry) is None
    assert verifier.rows == 50 and verifier.head == (50, entries[-1].hash)


@pytest.mark.parametrize(
    "field, value",
    [
        ("actor", "someone-else"),
        ("details", {"n": 17}),
        ("at", T0),
        ("action", "x"),
        ("subject", "alert-0"),
    ],
)
def test_changing_any_field_of_a_row_breaks_the_chain_at_that_row(
    field: str, value: object
) -> None:
    """Whatever stored field is edited, verify names the edited row and says it changed."""
    entries = chain(30)
    changes: dict[str, Any] = {field: value}
    entries[17] = dataclasses.replace(entries[17], **changes)
    broken = verify_entries(entries)
    assert broken is not None and broken.seq == 18
    assert "changed" in broken.reason


def test_recomputing_the_edited_rows_hash_moves_the_break_to_the_next_row() -> None:
    """A forger who also rewrites the row's hash is caught by the next row's link."""
    entries = chain(30)
    forged = dataclasses.replace(entries[9], details={"n": 999})
    entries[9] = dataclasses.replace(forged, hash=forged.expected_hash())
    broken = verify_entries(entries)
    assert broken is not None and broken.seq == 11
    assert "prev_hash" in broken.reason


def test_a_deleted_row_is_reported_as_missing() -> None:
    """Removing row 5 leaves a gap that verify names."""
    entries = chain(10)
    del entries[4]
    broken = verify_entries(entries)
    assert broken is not None and broken.seq == 5 and "missing" in broken.reason


def test_a_truncated_tail_is_found_only_against_a_known_head() -> None:
    """A shorter chain is still a valid chain; the head recorded elsewhere exposes it."""
    entries = chain(10)
    verifier = ChainVerifier()
    for entry in entries[:7]:
        verifier.feed(entry)
    assert verifier.check_head(None) is None
    broken = verifier.check_head(entries[-1].hash)
    assert broken is not None and broken.seq == 8


def test_naive_times_are_refused() -> None:
    """An audit time without an offset cannot be placed on the clock, so it is not sealed."""
    with pytest.raises(ValueError):
        seal(None, at=datetime(2026, 1, 1), actor="a", action="b", subject="", details={})  # noqa: DTZ001 - the naive time is the point
