"""MQTT topic contract between home devices and ingest.

A device publishes under ``vigil/v1/dev/{device_id}/{channel}``; the broker's ACL lets a device
write only under its own ``{device_id}`` (its MQTT username), so the topic is the authenticated
identity and the payload's ``device_id`` must agree with it.
"""

from __future__ import annotations

from dataclasses import dataclass

MQTT_PREFIX = "vigil/v1/dev"
# Subscribe to everything under the prefix, not only known channels: a message on an unknown
# channel must reach ingest so it can be dead-lettered with a reason rather than vanish.
MQTT_SUBSCRIPTION = f"{MQTT_PREFIX}/#"

#: The channel of the pipeline heartbeat, which a service device sends (``vigil heartbeat``).
HEARTBEAT_CHANNEL = "heartbeat"

#: channel -> the ``schema`` value a payload on that channel must carry
CHANNEL_SCHEMAS: dict[str, str] = {
    "temperature": "vigil.device.temperature.v1",
    "pump-status": "vigil.device.pump_status.v1",
    "pump-event": "vigil.device.pump_event.v1",
    # The pipeline heartbeat (a service device, not a patient's): see docs/mqtt.md section 3.5.
    HEARTBEAT_CHANNEL: "vigil.device.heartbeat.v1",
}


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    device_id: str
    channel: str


def topic_for(device_id: str, channel: str) -> str:
    if channel not in CHANNEL_SCHEMAS:
        raise ValueError(f"unknown channel {channel!r}")
    return f"{MQTT_PREFIX}/{device_id}/{channel}"


def parse_topic(topic: str) -> DeviceTopic | None:
    """The device and channel of a device topic, or None when the topic is not one."""
    prefix = MQTT_PREFIX + "/"
    if not topic.startswith(prefix):
        return None
    device_id, _, channel = topic[len(prefix) :].partition("/")
    if not device_id or channel not in CHANNEL_SCHEMAS:
        return None
    return DeviceTopic(device_id=device_id, channel=channel)
