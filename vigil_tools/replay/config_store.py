"""Versions of the rules config in PostgreSQL, so a replay can pin any past one.

Owns the replay side of the stored versions (migration 0032): a version is a manifest in
``rules_config_manifests`` named by its content hash (``config_pieces.content_hash_of``: its
label and the sha256 of each of its pieces), stored as changes against a parent version, and
its pieces (the base, each care-team protocol, each patient profile) in
``rules_config_pieces``, each named by the sha256 of its text. A version is immutable; loading
one rebuilds it from the chain of changes and checks every piece and the content hash again.
Saving one by hand (``vigil replay config save``) that differs from the newest also writes one
audit entry listing each threshold that changed, old -> new, in the same transaction (a
version without its audit entry cannot exist).

The rules service records every config it loads itself
(``services/rules/adapters/config_store.record_loaded_config``): the version, and a
``rules_config.loaded`` audit entry each time the loaded config changes. So a version is found
by its hash (or a prefix), by the ``config_version`` label an alert carries, or by a time: the
config the rules service had loaded then.

Versions stored whole before migration 0032 (``rules_config_versions``, named by the sha256 of
the whole config's canonical JSON) are still found by their hash, label or time, and checked
against that hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.rules.adapters.config_store import (
    CONFIG_LOADED,
    Manifest,
    manifest_entries,
    store_manifest,
)
from services.rules.domain.config_pieces import (
    config_from_pieces,
    content_hash_of,
    digest,
    pieces_of,
)
from vigil.audit import append
from vigil.audit.actions import AuditAction
from vigil_tools.replay.engine_port import ConfigError, PinnedRules, pin


@dataclass(frozen=True, slots=True)
class ConfigVersion:
    content_hash: str
    created_at: datetime
    created_by: str
    note: str | None


def threshold_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every leaf that differs between two configs, as ``{path, old, new}`` (None = absent)."""
    changes: list[dict[str, Any]] = []

    def walk(path: str, a: Any, b: Any) -> None:
        if isinstance(a, Mapping) or isinstance(b, Mapping):
            a_map = a if isinstance(a, Mapping) else {}
            b_map = b if isinstance(b, Mapping) else {}
            for key in sorted(set(a_map) | set(b_map)):
                walk(f"{path}.{key}" if path else str(key), a_map.get(key), b_map.get(key))
        elif a != b:
            changes.append({"path": path, "old": a, "new": b})

    walk("", old, new)
    return changes


_VERSION = "SELECT content_hash, created_at, created_by, note FROM rules_config_manifests"
_LEGACY = "SELECT content_hash, created_at, created_by, note FROM rules_config_versions"


async def save_config(
    conn: Any, rules: PinnedRules, *, created_by: str, note: str | None = None
) -> tuple[ConfigVersion, bool]:
    """Store a version (idempotent by hash); returns it and whether it was new."""
    async with conn.transaction():
        existing = await conn.fetchrow(_VERSION + " WHERE content_hash = $1", rules.content_hash)
        if existing is not None:
            return _version(existing), False
        previous = await conn.fetchrow(
            "SELECT content_hash FROM rules_config_manifests"
            " ORDER BY created_at DESC, content_hash LIMIT 1"
        )
        old_content: Mapping[str, Any] = {}
        if previous is not None:
            old_content = (await _from_manifest(conn, str(previous["content_hash"]))).content
        # Stored with every piece listed: a config saved by hand need not resemble the last.
        pieces = pieces_of(rules.config)
        manifest = Manifest.of(
            rules.label, {place: piece.digest for place, piece in pieces.items()}
        )
        await store_manifest(conn, manifest, pieces, parent=None, created_by=created_by, note=note)
        await append(
            conn,
            created_by,
            AuditAction.THRESHOLDS_CHANGED,
            rules.content_hash,
            {
                "from": previous["content_hash"] if previous else None,
                "to": rules.content_hash,
                "note": note,
                "changes": threshold_changes(old_content, rules.content),
            },
        )
        row = await conn.fetchrow(_VERSION + " WHERE content_hash = $1", rules.content_hash)
    return _version(row), True


def _version(row: Any) -> ConfigVersion:
    return ConfigVersion(
        content_hash=str(row["content_hash"]),
        created_at=row["created_at"],
        created_by=str(row["created_by"]),
        note=row["note"],
    )


async def load_version(conn: Any, content_hash: str) -> ConfigVersion:
    for query in (_VERSION, _LEGACY):
        row = await conn.fetchrow(query + " WHERE content_hash = $1", content_hash)
        if row is not None:
            return _version(row)
    raise LookupError(f"no rules config version {content_hash}")


async def load_config(conn: Any, version: str) -> PinnedRules:
    """The config named by ``version``: its content hash or a unique prefix of it, or the
    ``config_version`` label the rules gave it (what an alert carries, e.g. ``pg-3f2a9c81d0e4``).
    Rebuilt from its pieces and checked against its name."""
    hashes = await conn.fetch(
        "SELECT content_hash FROM rules_config_manifests WHERE content_hash LIKE $1 || '%' LIMIT 2",
        version.lower(),
    )
    if not hashes:
        # A derived label is a digest of the content, so one label names one stored config.
        hashes = await conn.fetch(
            "SELECT content_hash FROM rules_config_manifests WHERE config_version = $1 LIMIT 2",
            version,
        )
    if len(hashes) > 1:
        raise LookupError(f"{version} names more than one rules config version")
    if hashes:
        return await _from_manifest(conn, str(hashes[0]["content_hash"]))
    rows = await conn.fetch(
        "SELECT content_hash, config_text FROM rules_config_versions"
        " WHERE content_hash LIKE $1 || '%' LIMIT 2",
        version.lower(),
    )
    if not rows:
        rows = await conn.fetch(
            "SELECT content_hash, config_text FROM rules_config_versions"
            " WHERE config->>'config_version' = $1 LIMIT 2",
            version,
        )
    if not rows:
        raise LookupError(f"no rules config version {version!r} (hash, prefix or label)")
    if len(rows) > 1:
        raise LookupError(f"{version} names more than one rules config version")
    return _legacy(rows[0])


async def _from_manifest(conn: Any, content_hash: str) -> PinnedRules:
    """A stored version rebuilt from its pieces; every piece and the whole re-hashed."""
    label = await conn.fetchval(
        "SELECT config_version FROM rules_config_manifests WHERE content_hash = $1",
        content_hash,
    )
    if label is None:
        raise LookupError(f"no rules config version {content_hash}")
    entries = await manifest_entries(conn, content_hash)
    rows = await conn.fetch(
        "SELECT piece_hash, kind, piece_text FROM rules_config_pieces"
        " WHERE piece_hash = ANY($1::text[])",
        sorted(set(entries.values())),
    )
    texts = {row["piece_hash"]: (row["kind"], row["piece_text"]) for row in rows}
    for piece_hash, (_, text) in texts.items():
        if digest(text) != piece_hash:
            raise ConfigError(f"rules config piece {piece_hash} does not re-hash to its name")
    if content_hash_of(str(label), entries) != content_hash:
        raise ConfigError(
            f"rules config {content_hash} does not re-hash to its name; it cannot be pinned"
        )
    missing = set(entries.values()) - set(texts)
    if missing:
        raise ConfigError(f"rules config {content_hash} lacks {len(missing)} of its pieces")
    try:
        config = config_from_pieces(str(label), (texts[h] for h in entries.values()))
    except ValueError as error:
        raise ConfigError(f"rules config {content_hash}: {error}") from error
    rules = pin(config)
    if rules.content_hash != content_hash:
        raise ConfigError(f"rules config {content_hash} does not rebuild to its name")
    return rules


async def config_at(conn: Any, moment: datetime) -> PinnedRules:
    """The config that was live at ``moment``: the one the rules service had loaded then (its
    newest ``rules_config.loaded`` audit entry at or before ``moment``). Where the rules service
    recorded no load by then (it ran from a file or the built-in settings), the newest version
    saved by hand at or before ``moment`` (``saved_at``)."""
    subject = await conn.fetchval(
        "SELECT a.subject FROM audit_log a WHERE a.action = $1 AND a.at <= $2"
        " ORDER BY a.seq DESC LIMIT 1",
        CONFIG_LOADED,
        moment,
    )
    if subject is None:
        return await saved_at(conn, moment)
    return await _by_hash(conn, str(subject))


async def _by_hash(conn: Any, content_hash: str) -> PinnedRules:
    if await conn.fetchval(
        "SELECT 1 FROM rules_config_manifests WHERE content_hash = $1", content_hash
    ):
        return await _from_manifest(conn, content_hash)
    row = await conn.fetchrow(
        "SELECT content_hash, config_text FROM rules_config_versions WHERE content_hash = $1",
        content_hash,
    )
    if row is None:
        raise LookupError(f"no rules config version {content_hash}")
    return _legacy(row)


async def saved_at(conn: Any, moment: datetime) -> PinnedRules:
    """The newest version stored at or before ``moment``, however it was stored."""
    row = await conn.fetchrow(
        "SELECT content_hash, created_at FROM ("
        " SELECT content_hash, created_at FROM rules_config_manifests WHERE created_at <= $1"
        " UNION ALL"
        " SELECT content_hash, created_at FROM rules_config_versions WHERE created_at <= $1"
        ") AS stored ORDER BY created_at DESC, content_hash LIMIT 1",
        moment,
    )
    if row is None:
        raise LookupError(f"no rules config version saved at or before {moment.isoformat()}")
    return await _by_hash(conn, str(row["content_hash"]))


def _legacy(row: Any) -> PinnedRules:
    """A version stored whole before migration 0032, checked against the hash it was stored
    under (sha256 of its text)."""
    text = str(row["config_text"])
    if hashlib.sha256(text.encode()).hexdigest() != row["content_hash"]:
        raise ConfigError(
            f"rules config {row['content_hash']} does not re-hash to its name; it cannot be pinned"
        )
    return pin(json.loads(text))


async def list_versions(conn: Any) -> list[ConfigVersion]:
    rows = await conn.fetch(f"{_VERSION} UNION ALL {_LEGACY} ORDER BY created_at, content_hash")
    return [_version(row) for row in rows]
