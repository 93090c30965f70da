"""Versions of the rules config in PostgreSQL, so a replay can pin any past one.

Owns the replay side of ``rules_config_versions``. A version is immutable and named by the
sha256 of its canonical JSON; saving one by hand (``vigil replay config save``) that differs from
the newest also writes one audit entry listing each threshold that changed, old -> new, in the
same transaction (a version without its audit entry cannot exist).

The rules service records every config it loads itself
(``services/rules/adapters/config_store.record_loaded_config``): the version row, and a
``rules_config.loaded`` audit entry each time the loaded config changes. So a version is found
by its hash (or a prefix), by the ``config_version`` label an alert carries, or by a time: the
config the rules service had loaded then.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.rules.adapters.config_store import CONFIG_LOADED
from vigil.audit import append
from vigil.audit.actions import AuditAction
from vigil.replay.engine_port import ConfigError, PinnedRules, pin


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


async def save_config(
    conn: Any, rules: PinnedRules, *, created_by: str, note: str | None = None
) -> tuple[ConfigVersion, bool]:
    """Store a version (idempotent by hash); returns it and whether it was new."""
    async with conn.transaction():
        previous = await conn.fetchrow(
            "SELECT content_hash, config_text FROM rules_config_versions"
            " ORDER BY created_at DESC, content_hash LIMIT 1"
        )
        row = await conn.fetchrow(
            """
            INSERT INTO rules_config_versions (content_hash, config_text, config, created_by, note)
            VALUES ($1, $2::text, $2::text::jsonb, $3, $4)
            ON CONFLICT (content_hash) DO NOTHING
            RETURNING content_hash, created_at, created_by, note
            """,
            rules.content_hash,
            rules.canonical(),
            created_by,
            note,
        )
        if row is None:
            existing = await load_version(conn, rules.content_hash)
            return existing, False
        old_content = json.loads(previous["config_text"]) if previous else {}
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
    return _version(row), True


def _version(row: Any) -> ConfigVersion:
    return ConfigVersion(
        content_hash=str(row["content_hash"]),
        created_at=row["created_at"],
        created_by=str(row["created_by"]),
        note=row["note"],
    )


async def load_version(conn: Any, content_hash: str) -> ConfigVersion:
    row = await conn.fetchrow(
        "SELECT content_hash, created_at, created_by, note FROM rules_config_versions"
        " WHERE content_hash = $1",
        content_hash,
    )
    if row is None:
        raise LookupError(f"no rules config version {content_hash}")
    return _version(row)


async def load_config(conn: Any, version: str) -> PinnedRules:
    """The config named by ``version``: its content hash or a unique prefix of it, or the
    ``config_version`` label the rules gave it (what an alert carries, e.g. ``pg-3f2a9c81d0e4``).
    Re-hashed on load."""
    rows = await conn.fetch(
        "SELECT content_hash, config_text FROM rules_config_versions"
        " WHERE content_hash LIKE $1 || '%' LIMIT 2",
        version.lower(),
    )
    if not rows:
        # A label is a digest of the content, so one label names one stored config.
        rows = await conn.fetch(
            "SELECT content_hash, config_text FROM rules_config_versions"
            " WHERE config->>'config_version' = $1 LIMIT 2",
            version,
        )
    if not rows:
        raise LookupError(f"no rules config version {version!r} (hash, prefix or label)")
    if len(rows) > 1:
        raise LookupError(f"{version} names more than one rules config version")
    return _checked(rows[0])


async def config_at(conn: Any, moment: datetime) -> PinnedRules:
    """The config that was live at ``moment``: the one the rules service had loaded then (its
    newest ``rules_config.loaded`` audit entry at or before ``moment``). Where the rules service
    recorded no load by then (it ran from a file or the built-in settings), the newest version
    saved by hand at or before ``moment`` (``saved_at``)."""
    row = await conn.fetchrow(
        "SELECT v.content_hash, v.config_text FROM audit_log a"
        " JOIN rules_config_versions v ON v.content_hash = a.subject"
        " WHERE a.action = $1 AND a.at <= $2 ORDER BY a.seq DESC LIMIT 1",
        CONFIG_LOADED,
        moment,
    )
    if row is None:
        return await saved_at(conn, moment)
    return _checked(row)


async def saved_at(conn: Any, moment: datetime) -> PinnedRules:
    """The newest version stored at or before ``moment``, however it was stored."""
    row = await conn.fetchrow(
        "SELECT content_hash, config_text FROM rules_config_versions WHERE created_at <= $1"
        " ORDER BY created_at DESC, content_hash LIMIT 1",
        moment,
    )
    if row is None:
        raise LookupError(f"no rules config version saved at or before {moment.isoformat()}")
    return _checked(row)


def _checked(row: Any) -> PinnedRules:
    rules = pin(json.loads(row["config_text"]))
    if rules.content_hash != row["content_hash"]:
        raise ConfigError(
            f"rules config {row['content_hash']} does not re-hash to its name; it cannot be pinned"
        )
    return rules


async def list_versions(conn: Any) -> list[ConfigVersion]:
    rows = await conn.fetch(
        "SELECT content_hash, created_at, created_by, note FROM rules_config_versions"
        " ORDER BY created_at, content_hash"
    )
    return [_version(row) for row in rows]
