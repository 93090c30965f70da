"""The heartbeat publisher sends valid heartbeats on its device's topic, QoS 1, on schedule."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from schemas.device import HeartbeatMessage, parse_device_message
from schemas.topics import parse_topic
from vigil_tools.heartbeat import HeartbeatCounter, HeartbeatSettings, beat

START = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)


class FakeClient:
    """Records publishes; stops the run after ``limit`` of them, or fails on ``fail_at``."""

    def __init__(self, stop: asyncio.Event, limit: int, fail_at: int | None = None) -> None:
        self.published: list[tuple[str, bytes, int]] = []
        self.stop = stop
        self.limit = limit
        self.fail_at = fail_at

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        if self.fail_at is not None and len(self.published) == self.fail_at:
            raise ConnectionError("broker went away")
        self.published.append((topic, payload, qos))
        if len(self.published) == self.limit:
            self.stop.set()


async def test_heartbeats_are_valid_device_messages_on_the_heartbeat_channel() -> None:
    """Each publish is a HeartbeatMessage of the configured device on its own heartbeat topic,
    with QoS 1, a fresh message id and a rising seq."""
    stop = asyncio.Event()
    client = FakeClient(stop, limit=3)
    settings = HeartbeatSettings(device_id="heartbeat-unit", interval_s=0.1)
    counter = HeartbeatCounter(START)
    await beat(client, settings, counter, stop, clock=lambda: START)

    assert counter.published == 3
    messages = []
    for topic, payload, qos in client.published:
        parsed = parse_topic(topic)
        assert parsed is not None and parsed.channel == "heartbeat"
        assert parsed.device_id == "heartbeat-unit" and qos == 1
        message = parse_device_message(payload)
        assert isinstance(message, HeartbeatMessage)
        assert message.device_id == "heartbeat-unit" and message.device_time == START
        messages.append(message)
    assert [m.seq for m in messages] == [m.seq for m in sorted(messages, key=lambda m: m.seq)]
    assert len({m.seq for m in messages}) == 3
    assert len({m.message_id for m in messages}) == 3


async def test_a_failed_publish_is_raised_and_its_seq_reused_by_the_next_try() -> None:
    """A publish that fails is not counted, the error reaches the reconnect loop, and the seq
    it would have used is still free for the next heartbeat (no gap claimed as sent)."""
    stop = asyncio.Event()
    client = FakeClient(stop, limit=10, fail_at=1)
    settings = HeartbeatSettings(device_id="heartbeat-unit", interval_s=0.1)
    counter = HeartbeatCounter(START)
    first_seq = counter.next_seq
    with pytest.raises(ConnectionError):
        await beat(client, settings, counter, stop, clock=lambda: START)
    assert counter.published == 1
    assert counter.next_seq == first_seq + 1


def test_settings_refuse_a_device_id_the_contract_refuses() -> None:
    """A device id that ingest would refuse fails when the settings are built, not later."""
    with pytest.raises(ValueError):
        HeartbeatSettings(device_id="bad id/with slash")
