"""``vigil heartbeat``: the pipeline's pulse, published over MQTT on a fixed schedule.

Owns the heartbeat publisher: every ``interval_s`` it publishes one ``HeartbeatMessage`` (QoS 1)
on ``vigil/v1/dev/{device_id}/heartbeat`` as a registered service device, through the same
broker, account checks and ingest validation as any home device. Rules turn each one into a
``pipeline.heartbeat`` alert; notify records it and pages the technical on-call when they stop
arriving (docs/notify.md, "Self-watch"). The publisher decides nothing about health itself: its
only job is to keep beating, reconnecting after a broker outage, so that silence means a stage
downstream stopped (or this process did, which is also worth a page).

Outside development (``VIGIL_ENVIRONMENT``, see vigil.environment) it refuses to start without
its account's password; ``VIGIL_HEARTBEAT_MQTT_TLS_CA_FILE`` makes it connect over TLS (with
``VIGIL_MQTT_PORT`` the broker's TLS listener), as a deployment's devices do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Protocol, Self

import aiomqtt
import orjson
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from schemas.device import DEVICE_ID_PATTERN
from schemas.topics import HEARTBEAT_CHANNEL, topic_for
from vigil.environment import (
    ServiceSettings,
    refuse_outside_development,
    secret_problem,
)
from vigil.runtime import configure_logging, log_fields, run_until_signalled, utcnow
from vigil.settings import MqttSettings

log = logging.getLogger("vigil.heartbeat")

HEARTBEAT_SCHEMA = "vigil.device.heartbeat.v1"


class HeartbeatSettings(ServiceSettings):
    """Read from ``VIGIL_HEARTBEAT_*``; the broker's address from ``VIGIL_MQTT_*``."""

    model_config = SettingsConfigDict(env_prefix="VIGIL_HEARTBEAT_", extra="ignore")

    device_id: str = Field(default="heartbeat-pipeline", pattern=DEVICE_ID_PATTERN)
    interval_s: float = Field(
        default=15.0,
        ge=0.1,
        description="Seconds between heartbeats; keep it well under notify's heartbeat timeout.",
    )
    # None: the device's own account (its id). A gateway account (e.g. the local stack's
    # ``vigil-sim``) may publish for it too.
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    # None: the device id, as the device contract asks (one connection per device).
    mqtt_client_id: str | None = None
    # CA certificate of the broker's TLS listener; set it to connect over TLS.
    mqtt_tls_ca_file: Path | None = None
    publish_timeout_s: float = Field(default=10.0, gt=0)
    reconnect_max_s: float = Field(default=15.0, gt=0)
    log_level: str = "INFO"

    mqtt: MqttSettings = Field(default_factory=MqttSettings)

    @model_validator(mode="after")
    def _secrets_outside_development(self) -> Self:
        refuse_outside_development(
            self.environment,
            "the heartbeat publisher",
            [secret_problem("VIGIL_HEARTBEAT_MQTT_PASSWORD", self.mqtt_password)],
        )
        return self


class PublishClient(Protocol):
    """What the publisher needs of an MQTT client: ``aiomqtt.Client`` has it, a test fake too."""

    async def publish(self, topic: str, payload: bytes, qos: int) -> None: ...


def heartbeat_payload(device_id: str, seq: int, at: datetime) -> bytes:
    """One heartbeat message: the common device fields, a fresh message id, nothing else."""
    return orjson.dumps(
        {
            "schema": HEARTBEAT_SCHEMA,
            "message_id": str(uuid.uuid4()),
            "device_id": device_id,
            "seq": seq,
            "device_time": at.isoformat(),
        }
    )


class HeartbeatCounter:
    """The device's seq: started from the clock in milliseconds, so a restarted publisher never
    reuses one (ingest dead-letters a reused seq), and one more per heartbeat."""

    def __init__(self, now: datetime) -> None:
        self.next_seq = int(now.timestamp() * 1000)
        self.published = 0


async def beat(
    client: PublishClient,
    settings: HeartbeatSettings,
    counter: HeartbeatCounter,
    stop: asyncio.Event,
    *,
    clock: Callable[[], datetime] = utcnow,
) -> None:
    """Publish a heartbeat every ``interval_s`` until ``stop``; raises when a publish fails.

    The schedule is fixed to the monotonic clock, so a slow publish does not stretch it.
    """
    topic = topic_for(settings.device_id, HEARTBEAT_CHANNEL)
    loop = asyncio.get_running_loop()
    due = loop.time()
    while not stop.is_set():
        seq = counter.next_seq
        payload = heartbeat_payload(settings.device_id, seq, clock())
        async with asyncio.timeout(settings.publish_timeout_s):
            await client.publish(topic, payload, 1)
        counter.next_seq = seq + 1
        counter.published += 1
        due = max(due + settings.interval_s, loop.time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), due - loop.time())


async def run(
    settings: HeartbeatSettings,
    stop: asyncio.Event,
    *,
    clock: Callable[[], datetime] = utcnow,
) -> int:
    """Beat until ``stop``, reconnecting with backoff when the broker goes away.

    Returns how many heartbeats the broker acknowledged.
    """
    counter = HeartbeatCounter(clock())
    password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
    tls = None
    if settings.mqtt_tls_ca_file is not None:
        tls = aiomqtt.TLSParameters(ca_certs=str(settings.mqtt_tls_ca_file))
    backoff = 0.5
    log.info(
        "heartbeat_started",
        extra=log_fields(
            device_id=settings.device_id,
            interval_s=settings.interval_s,
            broker=f"{settings.mqtt.host}:{settings.mqtt.port}",
        ),
    )
    while not stop.is_set():
        client = aiomqtt.Client(
            settings.mqtt.host,
            settings.mqtt.port,
            username=settings.mqtt_username or settings.device_id,
            password=password,
            identifier=settings.mqtt_client_id or settings.device_id,
            keepalive=settings.mqtt.keepalive_s,
            tls_params=tls,
            # A clean session: a heartbeat that missed its moment proves nothing later, and the
            # next one replaces it; a persistent session would only replay stale beats.
            clean_session=True,
        )
        started = time.monotonic()
        try:
            async with client:
                await beat(client, settings, counter, stop, clock=clock)
        except (aiomqtt.MqttError, TimeoutError) as error:
            if time.monotonic() - started > settings.reconnect_max_s:
                backoff = 0.5  # it was up for a while: this is a new outage
            log.warning(
                "heartbeat_publish_failed",
                extra=log_fields(error=str(error) or repr(error), retry_s=backoff),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, settings.reconnect_max_s)
    log.info("heartbeat_stopped", extra=log_fields(published=counter.published))
    return counter.published


def main(argv: list[str] | None = None) -> int:
    """Process entry point: ``vigil heartbeat``."""
    parser = argparse.ArgumentParser(
        prog="vigil heartbeat",
        description="Publish the pipeline heartbeat over MQTT (settings from VIGIL_HEARTBEAT_* "
        "and VIGIL_MQTT_* environment variables).",
    )
    parser.add_argument("--interval", type=float, help="seconds between heartbeats")
    parser.add_argument("--device-id", help="the registered heartbeat device")
    args = parser.parse_args(argv)
    overrides: dict[str, object] = {}
    if args.interval is not None:
        overrides["interval_s"] = args.interval
    if args.device_id is not None:
        overrides["device_id"] = args.device_id
    settings = HeartbeatSettings(**overrides)  # type: ignore[arg-type]
    configure_logging(settings.log_level)

    async def service(stop: asyncio.Event) -> None:
        await run(settings, stop)

    return run_until_signalled(service)
