"""Device credentials on the real broker: a device speaks only for itself, and revoked or rotated
passwords stop working. Each change is recorded in ``device_credential_events``."""

from __future__ import annotations

import asyncio
import uuid

import aiomqtt
import asyncpg
import pytest

from services.ingest.adapters.credentials import (
    issue_credential,
    revoke_credential,
    rotate_credential,
)
from vigil_tools.stack.accounts import LocalStackBroker

pytestmark = pytest.mark.stack


def device_client(env: dict[str, str], device_id: str, password: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        int(env["VIGIL_MQTT_PORT"]),
        username=device_id,
        password=password,
        identifier=device_id,  # the only client id the broker lets a device account use
        protocol=aiomqtt.ProtocolVersion.V5,
    )


async def next_topic(messages: aiomqtt.client.MessagesIterator) -> str:
    message = await asyncio.wait_for(anext(messages), 10)
    return message.topic.value


async def test_device_cannot_publish_on_another_devices_topic(stack_env: dict[str, str]) -> None:
    """The broker drops A's publish under B's topic: a watcher sees A's later marker, not it."""
    run = uuid.uuid4().hex[:8]
    a, b = f"acl-a-{run}", f"acl-b-{run}"
    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    broker = LocalStackBroker()
    try:
        password_a = await issue_credential(conn, broker, a)
        await issue_credential(conn, broker, b)
        async with aiomqtt.Client(
            "127.0.0.1",
            int(stack_env["VIGIL_MQTT_PORT"]),
            username=stack_env["VIGIL_INGEST_MQTT_USERNAME"],
            password=stack_env["VIGIL_INGEST_MQTT_PASSWORD"],
            identifier=f"acl-watch-{run}",
        ) as watcher:
            await watcher.subscribe(f"vigil/v1/dev/{a}/#", qos=1)
            await watcher.subscribe(f"vigil/v1/dev/{b}/#", qos=1)
            async with device_client(stack_env, a, password_a) as device:
                await device.publish(f"vigil/v1/dev/{b}/temperature", b"{}", qos=1)
            # Mosquitto closes the offending connection; reconnect to send the marker.
            async with device_client(stack_env, a, password_a) as device:
                await device.publish(f"vigil/v1/dev/{a}/temperature", b"marker", qos=1)
            # One broker thread routes in order: had the forbidden message passed, it would
            # have reached the watcher before the marker.
            assert await next_topic(watcher.messages) == f"vigil/v1/dev/{a}/temperature"
    finally:
        await revoke_credential(conn, broker, a)
        await revoke_credential(conn, broker, b)
        await conn.close()


async def test_revoked_credential_is_refused(stack_env: dict[str, str]) -> None:
    """After revocation the device's password no longer opens a connection."""
    run = uuid.uuid4().hex[:8]
    device_id = f"revoke-{run}"
    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    broker = LocalStackBroker()
    try:
        password = await issue_credential(conn, broker, device_id)
        async with device_client(stack_env, device_id, password):
            pass
        await revoke_credential(conn, broker, device_id)
        with pytest.raises(aiomqtt.MqttError):
            async with device_client(stack_env, device_id, password):
                pass
        actions = [
            r["action"]
            for r in await conn.fetch(
                "SELECT action FROM device_credential_events WHERE device_id = $1 ORDER BY at",
                device_id,
            )
        ]
        assert actions == ["issued", "revoked"]
    finally:
        await conn.close()


async def test_rotation_replaces_the_password(stack_env: dict[str, str]) -> None:
    """The rotated password works and the previous one is refused."""
    run = uuid.uuid4().hex[:8]
    device_id = f"rotate-{run}"
    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    broker = LocalStackBroker()
    try:
        old = await issue_credential(conn, broker, device_id)
        new = await rotate_credential(conn, broker, device_id)
        assert new != old
        async with device_client(stack_env, device_id, new):
            pass
        with pytest.raises(aiomqtt.MqttError):
            async with device_client(stack_env, device_id, old):
                pass
    finally:
        await revoke_credential(conn, broker, device_id)
        await conn.close()


async def test_rotating_a_device_without_account_is_refused(stack_env: dict[str, str]) -> None:
    """Rotation never mints a credential for a device nobody issued one to."""
    from vigil_tools.stack import StackError

    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    try:
        with pytest.raises(StackError):
            await rotate_credential(conn, LocalStackBroker(), f"never-{uuid.uuid4().hex[:8]}")
    finally:
        await conn.close()
