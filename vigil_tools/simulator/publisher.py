"""Publishes a simulated fleet's messages over MQTT: the simulator's only I/O.

The fleet (``vigil_tools.simulator.fleet``) decides what each device says and when; this
module reads the wall clock, hands it to the fleet, and publishes what comes back with QoS 1 as the
``vigil-sim`` gateway account.

End-to-end acknowledgement (docs/mqtt.md 4.1): with an ``Outbox``, every message stays in it
after its PUBACK, until ingest names it on ``vigil/v1/ack/{device_id}`` (the gateway subscribes to
``vigil/v1/ack/+`` with a persistent session); one unanswered after ``resend_after_s`` is
published again unchanged, oldest first. This is the reference device and hub of the contract.

Back-pressure: aiomqtt's ``publish`` returns only when the broker's PUBACK arrives, and a
semaphore caps how many publishes wait at once. The producer blocks on that semaphore, so no more
than ``max_inflight`` QoS 1 messages are ever unacknowledged. A publisher that queues without such
a bound runs through MQTT's 65,535 packet ids under load and stalls.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Protocol

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from schemas.ack import ACK_PREFIX
from schemas.topics import CHANNEL_SCHEMAS, HEARTBEAT_CHANNEL
from vigil.runtime import configure_logging, log_fields, run_until_signalled, utcnow
from vigil_tools.simulator.fleet import Fleet, Outgoing, parse_scenario_spec
from vigil_tools.simulator.outbox import Outbox
from vigil_tools.simulator.settings import SimulatorSettings

log = logging.getLogger("vigil.simulator")

PUBLISHED = "published"
RESENT = "resent"
#: The gateway's subscription to the acknowledgements of every device it publishes for.
ACK_SUBSCRIPTION = f"{ACK_PREFIX}/+"
_MIN_WAIT_S = 0.005


async def _wait_for_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``stop`` is set, whichever comes first."""
    if seconds <= 0:
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


class PublishClient(Protocol):
    """What the publisher needs of an MQTT client: ``aiomqtt.Client`` has it, a test fake too."""

    async def publish(self, topic: str, payload: bytes, qos: int) -> None: ...


class PublishFailed(aiomqtt.MqttError):
    """A publish was not acknowledged: the connection dropped or the broker did not answer."""


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def publish_fleet(
    client: PublishClient,
    fleet: Fleet,
    stop: asyncio.Event,
    *,
    qos: int = 1,
    max_inflight: int = 200,
    publish_timeout_s: float = 30.0,
    deadline: datetime | None = None,
    clock: Callable[[], datetime] = utcnow,
    outbox: Outbox | None = None,
    monotonic: Callable[[], float] = time.monotonic,
) -> dict[str, int]:
    """Advance ``fleet`` by ``clock`` and publish what it emits, until ``deadline`` or ``stop``.

    At most ``max_inflight`` publishes are unacknowledged at any moment: the loop waits for a
    free slot before it takes the next message. Returns the acknowledged count per channel and
    in total (``published``); raises ``PublishFailed`` when a publish fails. With ``outbox``, each
    message is kept in it until answered end to end (``settle_acks``), and what falls due is
    published again, unchanged (counted as ``resent``).
    """
    # Every channel a home device uses; the pipeline heartbeat is not the fleet's to send.
    counts: Counter[str] = Counter(
        {channel: 0 for channel in CHANNEL_SCHEMAS if channel != HEARTBEAT_CHANNEL}
    )
    inflight = asyncio.Semaphore(max_inflight)

    async def resend(topic: str, payload: bytes) -> None:
        try:
            async with asyncio.timeout(publish_timeout_s):
                await client.publish(topic, payload, qos)
        finally:
            inflight.release()
        counts[RESENT] += 1

    async def publish(outgoing: Outgoing) -> None:
        try:
            async with asyncio.timeout(publish_timeout_s):
                await client.publish(outgoing.topic, outgoing.payload(), qos)
        finally:
            inflight.release()
        counts[outgoing.channel] += 1
        counts[PUBLISHED] += 1

    try:
        async with asyncio.TaskGroup() as publishes:
            while not stop.is_set():
                now = clock()
                if deadline is not None and now >= deadline:
                    break
                if outbox is not None:
                    for entry in outbox.due(monotonic()):
                        await inflight.acquire()
                        publishes.create_task(resend(entry.topic, entry.payload))
                for outgoing in fleet.advance(now):
                    if outbox is not None:
                        message = outgoing.message
                        outbox.add(
                            outgoing.device_id,
                            str(message.message_id),
                            message.seq,
                            outgoing.topic,
                            outgoing.payload(),
                            monotonic(),
                        )
                    await inflight.acquire()
                    # Tasks start in creation order, so each device's messages leave in seq
                    # order even though several are in flight at once.
                    publishes.create_task(publish(outgoing))
                wake_at = fleet.next_due() if deadline is None else min(fleet.next_due(), deadline)
                delay = (wake_at - clock()).total_seconds()
                resend_at = outbox.next_due() if outbox is not None else None
                if resend_at is not None:
                    delay = min(delay, resend_at - monotonic())
                # Staggered devices would wake the loop once each; a 5 ms floor lets one wake-up
                # serve several, at the cost of a few milliseconds on their readings' times.
                await _wait_for_stop(stop, max(delay, _MIN_WAIT_S) if delay > 0 else 0)
            # Leaving the task group waits for every outstanding acknowledgement, so the counts
            # returned are final.
    except ExceptionGroup as group:
        first = _first_leaf(group)
        log.error(
            "simulator_publish_failed",
            extra=log_fields(error=str(first), published=counts[PUBLISHED]),
        )
        # One plain error for the caller, not the task group's ExceptionGroup.
        raise PublishFailed(f"publishing failed after {counts[PUBLISHED]}: {first}") from group
    return dict(counts)


async def settle_acks(client: aiomqtt.Client, outbox: Outbox, counts: Counter[str]) -> None:
    """Take every message ingest answers out of ``outbox``; a rejection is logged by reason."""
    async for message in client.messages:
        if not isinstance(message.payload, bytes | bytearray):
            continue
        try:
            settled = outbox.settle(bytes(message.payload))
        except ValueError:
            log.warning("simulator_bad_ack", extra=log_fields(topic=str(message.topic)))
            continue
        counts["answered_stored"] += settled.stored
        for rejection in settled.rejected:
            counts["answered_rejected"] += 1
            log.warning(
                "simulator_message_rejected",
                extra=log_fields(
                    device_id=rejection.device_id, seq=rejection.seq, reason=rejection.reason
                ),
            )


async def run(settings: SimulatorSettings, stop: asyncio.Event) -> dict[str, int]:
    """Publish the fleet's messages until ``duration_s`` passes or ``stop`` is set.

    Returns how many messages the broker acknowledged, per channel and in total (``published``).
    Raises ``aiomqtt.MqttError`` when the broker refuses the connection or a publish fails.
    """
    start = utcnow()
    fleet = Fleet(
        parse_scenario_spec(settings.scenario, settings.patients),
        start=start,
        interval_s=settings.interval_s,
        seed=settings.seed,
        timing=settings.timing(),
        first_patient=settings.first_patient,
    )
    deadline = (
        None if settings.duration_s is None else start + timedelta(seconds=settings.duration_s)
    )
    client_id = settings.mqtt_client_id or f"vigil-sim-{os.getpid()}-{start.timestamp():.0f}"
    log.info(
        "simulator_started",
        extra=log_fields(
            patients=settings.patients,
            interval_s=settings.interval_s,
            scenario=settings.scenario,
            broker=f"{settings.mqtt.host}:{settings.mqtt.port}",
            client_id=client_id,
        ),
    )
    # MQTT 5 persistent session: acknowledgements published while the link is down wait for it.
    session = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    session.SessionExpiryInterval = 3600
    client = aiomqtt.Client(
        settings.mqtt.host,
        settings.mqtt.port,
        username=settings.mqtt_username,
        password=settings.mqtt_password or None,
        identifier=client_id,
        keepalive=settings.mqtt.keepalive_s,
        # Matches the semaphore, so paho never holds publishes back in a queue of its own.
        max_inflight_messages=settings.max_inflight,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=session,
    )
    outbox = Outbox(settings.resend_after_s) if settings.end_to_end_acks else None
    answers: Counter[str] = Counter()
    # aiomqtt warns on every publish past 10 pending calls; the semaphore is the real bound.
    client.pending_calls_threshold = settings.max_inflight
    try:
        async with client:
            settler = None
            if outbox is not None:
                await client.subscribe(ACK_SUBSCRIPTION, qos=1)
                settler = asyncio.create_task(settle_acks(client, outbox, answers))
            try:
                counts = await publish_fleet(
                    client,
                    fleet,
                    stop,
                    qos=settings.qos,
                    max_inflight=settings.max_inflight,
                    publish_timeout_s=settings.publish_timeout_s,
                    deadline=deadline,
                    outbox=outbox,
                )
            finally:
                if settler is not None:
                    settler.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await settler
    except PublishFailed:
        raise
    except aiomqtt.MqttError as error:
        # Connecting failed (address, credentials): nothing was published.
        log.error("simulator_connect_failed", extra=log_fields(error=str(error)))
        raise
    counts.update(answers)
    if outbox is not None:
        counts["unanswered"] = len(outbox)
    log.info("simulator_stopped", extra=log_fields(**counts))
    return counts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vigil_tools.simulator",
        description="Publish a fleet of simulated home thermometers and infusion pumps over MQTT.",
    )
    parser.add_argument("--patients", type=int, help="number of simulated patients")
    parser.add_argument("--interval", type=float, help="seconds between one device's readings")
    parser.add_argument(
        "--scenario", help="per-patient scenarios, e.g. 'fever:1,occlusion:1,normal:rest'"
    )
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--seed", type=int, help="seed for reproducible readings")
    return parser


def settings_from_args(argv: Sequence[str] | None = None) -> SimulatorSettings:
    """Settings from the environment, with command-line flags taking precedence."""
    args = _parser().parse_args(argv)
    overrides = {
        name: value
        for name, value in (
            ("patients", args.patients),
            ("interval_s", args.interval),
            ("scenario", args.scenario),
            ("duration_s", args.duration),
            ("seed", args.seed),
        )
        if value is not None
    }
    return SimulatorSettings(**overrides)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    try:
        settings = settings_from_args(argv)
    except ValueError as error:
        # pydantic's ValidationError is a ValueError; a bad spec reads better than a traceback.
        print(f"vigil simulator: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)

    async def service(stop: asyncio.Event) -> None:
        await run(settings, stop)

    try:
        return run_until_signalled(service)
    except aiomqtt.MqttError:
        # Already logged by ``run`` with what failed.
        return 1
