"""The care-team API's logins on PostgreSQL (``api_users``, ``api_user_care_teams``; the
sessions' end, migration 0044): each change and its audit entry in one transaction
(``services.api.service_layer.users``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from services.api.domain.access import Role
from services.api.service_layer.users import NewUser, UserRecord

_SELECT = """
SELECT u.user_id, u.username, u.display_name, u.role, u.active, u.created_at,
       u.sessions_revoked_at,
       coalesce(array_agg(t.care_team_id ORDER BY t.care_team_id)
                FILTER (WHERE t.care_team_id IS NOT NULL), '{}') AS care_teams
FROM api_users u LEFT JOIN api_user_care_teams t USING (user_id)
"""


def _record(row: Any) -> UserRecord:
    return UserRecord(
        user_id=row["user_id"],
        username=row["username"],
        display_name=row["display_name"],
        role=Role(row["role"]),
        active=row["active"],
        care_teams=tuple(row["care_teams"]),
        created_at=row["created_at"],
        sessions_revoked_at=row["sessions_revoked_at"],
    )


async def _audit(
    conn: asyncpg.Connection, actor: str, action: str, user: UserRecord, details: dict[str, Any]
) -> None:
    from vigil.audit import append

    await append(
        conn, actor, action, f"user:{user.user_id}", {"username": user.username, **details}
    )


class PostgresUserStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def users(self) -> list[UserRecord]:
        rows = await self._pool.fetch(f"{_SELECT} GROUP BY u.user_id ORDER BY u.username")
        return [_record(r) for r in rows]

    async def user(self, username: str) -> UserRecord | None:
        return await self._user(self._pool, username)

    @staticmethod
    async def _user(db: Any, username: str) -> UserRecord | None:
        row = await db.fetchrow(f"{_SELECT} WHERE u.username = $1 GROUP BY u.user_id", username)
        return None if row is None else _record(row)

    async def unknown_teams(self, care_teams: Sequence[str]) -> list[str]:
        rows = await self._pool.fetch(
            "SELECT t FROM unnest($1::text[]) AS t "
            "WHERE NOT EXISTS (SELECT 1 FROM care_teams c WHERE c.care_team_id = t)",
            list(care_teams),
        )
        return [r["t"] for r in rows]

    async def add(
        self, actor: str, user_id: str, new: NewUser, display_name: str, password_hash: str
    ) -> UserRecord | None:
        async with self._pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                """
                INSERT INTO api_users (user_id, username, display_name, password_hash, role)
                VALUES ($1, $2, $3, $4, $5)
                ON CONFLICT (username) DO NOTHING
                RETURNING user_id
                """,
                user_id,
                new.username,
                display_name,
                password_hash,
                new.role.value,
            )
            if inserted is None:
                return None
            await conn.executemany(
                "INSERT INTO api_user_care_teams (user_id, care_team_id) VALUES ($1, $2)",
                [(user_id, team) for team in new.care_teams],
            )
            user = await self._user(conn, new.username)
            assert user is not None
            await _audit(
                conn,
                actor,
                "user.created",
                user,
                {"role": user.role.value, "care_teams": list(user.care_teams)},
            )
            return user

    async def deactivate(self, actor: str, username: str, at: datetime) -> UserRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE api_users SET active = false, sessions_revoked_at = $2 WHERE username = $1",
                username,
                at,
            )
            user = await self._user(conn, username)
            assert user is not None
            await _audit(
                conn, actor, "user.deactivated", user, {"sessions_ended_at": at.isoformat()}
            )
            return user

    async def set_password(
        self, actor: str, username: str, password_hash: str, at: datetime
    ) -> UserRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE api_users SET password_hash = $2, sessions_revoked_at = $3 "
                "WHERE username = $1",
                username,
                password_hash,
                at,
            )
            user = await self._user(conn, username)
            assert user is not None
            await _audit(
                conn, actor, "user.password_reset", user, {"sessions_ended_at": at.isoformat()}
            )
            return user

    async def set_role(self, actor: str, username: str, role: Role) -> UserRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            before = await conn.fetchval(
                "SELECT role FROM api_users WHERE username = $1 FOR UPDATE", username
            )
            await conn.execute(
                "UPDATE api_users SET role = $2 WHERE username = $1", username, role.value
            )
            user = await self._user(conn, username)
            assert user is not None
            await _audit(conn, actor, "user.role_changed", user, {"from": before, "to": role.value})
            return user

    async def set_care_teams(
        self, actor: str, username: str, care_teams: Sequence[str]
    ) -> UserRecord:
        async with self._pool.acquire() as conn, conn.transaction():
            user_id = await conn.fetchval(
                "SELECT user_id FROM api_users WHERE username = $1 FOR UPDATE", username
            )
            before = await conn.fetch(
                "SELECT care_team_id FROM api_user_care_teams WHERE user_id = $1 "
                "ORDER BY care_team_id",
                user_id,
            )
            await conn.execute(
                "DELETE FROM api_user_care_teams WHERE user_id = $1 AND NOT care_team_id = ANY($2)",
                user_id,
                list(care_teams),
            )
            await conn.executemany(
                "INSERT INTO api_user_care_teams (user_id, care_team_id) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING",
                [(user_id, team) for team in care_teams],
            )
            user = await self._user(conn, username)
            assert user is not None
            await _audit(
                conn,
                actor,
                "user.care_teams_changed",
                user,
                {"from": [r["care_team_id"] for r in before], "to": list(user.care_teams)},
            )
            return user
