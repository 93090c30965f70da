"""Device credential lifecycle: issue, rotate and revoke a device's MQTT account, with an audit row.

The broker owns the credential itself (a hashed password file plus an ACL that pins a device to
``vigil/v1/dev/<its id>/#``); this module changes it through a ``BrokerAccounts`` (the local stack's
Mosquitto: ``vigil_tools.stack.accounts``) and records each change in ``device_credential_events``
so an auditor can see who could speak for which device, and when. The password is returned to the
caller once and stored nowhere else.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Protocol

import asyncpg

from vigil.runtime import utcnow


class BrokerAccounts(Protocol):
    def issue(self, device_id: str) -> str: ...
    def rotate(self, device_id: str) -> str: ...
    def revoke(self, device_id: str) -> None: ...


async def _record(
    conn: asyncpg.Connection | asyncpg.Pool, device_id: str, action: str, at: datetime
) -> None:
    await conn.execute(
        "INSERT INTO device_credential_events (device_id, action, at) VALUES ($1, $2, $3) "
        "ON CONFLICT DO NOTHING",
        device_id,
        action,
        at,
    )


async def issue_credential(
    conn: asyncpg.Connection | asyncpg.Pool, broker: BrokerAccounts, device_id: str
) -> str:
    """Create (or replace) the device's account; returns its password."""
    # The broker calls run mosquitto_passwd and wait for a reload: keep them off the loop.
    password = await asyncio.to_thread(broker.issue, device_id)
    await _record(conn, device_id, "issued", utcnow())
    return password


async def rotate_credential(
    conn: asyncpg.Connection | asyncpg.Pool, broker: BrokerAccounts, device_id: str
) -> str:
    """Give an existing account a new password; the old one stops working."""
    password = await asyncio.to_thread(broker.rotate, device_id)
    await _record(conn, device_id, "rotated", utcnow())
    return password


async def revoke_credential(
    conn: asyncpg.Connection | asyncpg.Pool, broker: BrokerAccounts, device_id: str
) -> None:
    """Delete the account; a connected device is disconnected and cannot reconnect."""
    await asyncio.to_thread(broker.revoke, device_id)
    await _record(conn, device_id, "revoked", utcnow())
