"""A broker of a fault test's own, a paced QoS 1 publisher and an ingest-like subscriber.

``OwnBroker`` runs Mosquitto with the local stack's own configuration
(``vigil_tools.stack.mosquitto``) in a temporary directory on free loopback ports, so a test can
restart or kill it without touching the shared test stack. ``PacedPublisher`` is a device (or hub)
as docs/mqtt.md asks for: QoS 1, a persistent session, every unacknowledged message kept and sent
again after a reconnect. ``ShareSubscriber`` connects as ingest does (MQTT 5, clean start off, a
session expiry, the shared subscription at QoS 1, re-subscribed on every connection) and
acknowledges a message after recording it. Both run paho's network loop in a thread of their own.

``python -m tests.broker_faults`` runs one fault and prints its figures as one JSON line (the
figures in docs/reliability.md come from it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.polling import eventually_sync
from vigil_tools.stack import mosquitto
from vigil_tools.stack.credentials import INGEST_MQTT_USER, SIM_MQTT_USER, ensure_secrets
from vigil_tools.stack.process import await_exit, port_accepts, running_pid
from vigil_tools.stack.settings import StackSettings

# What the subscriber subscribes to: ingest's default (the device topics directly); --topic
# "$share/vigil-ingest/vigil/v1/dev/#" for a share group.
SHARED_TOPIC = "vigil/v1/dev/#"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class OwnBroker:
    """Mosquitto with the stack's configuration, in ``data_dir``, on ports of its own."""

    def __init__(self, data_dir: Path, **overrides: Any) -> None:
        ports: set[int] = set()
        while len(ports) < 6:
            ports.add(free_port())
        mqtt_port, tls_port, kafka, controller, pg, smtp = sorted(ports)
        self.settings = StackSettings(
            data_dir=data_dir,
            mqtt_port=mqtt_port,
            mqtt_tls_port=tls_port,
            kafka_port=kafka,
            kafka_controller_port=controller,
            pg_port=pg,
            smtp_port=smtp,
            **overrides,
        )
        self.secrets = ensure_secrets(self.settings)
        # The stack's device-account commands refuse a directory `up` never prepared.
        self.settings.marker_file.parent.mkdir(parents=True, exist_ok=True)
        self.settings.marker_file.touch()

    @property
    def port(self) -> int:
        return self.settings.mqtt_port

    @property
    def pid(self) -> int | None:
        return running_pid(mosquitto.component(self.settings))

    def start(self) -> None:
        mosquitto.start(self.settings)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the broker with ``sig`` (SIGTERM saves its state, SIGKILL does not)."""
        pid = self.pid
        if pid is None:
            return
        os.kill(pid, sig)
        await_exit(mosquitto.component(self.settings), pid, timeout_s=30.0)
        eventually_sync(
            lambda: not port_accepts(self.port),
            timeout_s=10.0,
            interval_s=0.02,
            what="the broker's port to close",
        )

    def add_device(self, device_id: str) -> str:
        return mosquitto.add_device_credential(self.settings, device_id)

    def log_text(self) -> str:
        return mosquitto.component(self.settings).log_file.read_text(errors="replace")


def _payload(device_id: str, seq: int) -> bytes:
    return json.dumps(
        {"device_id": device_id, "seq": seq, "message_id": str(uuid.uuid4())}
    ).encode()


@dataclass
class PublisherCounts:
    published: dict[str, int] = field(default_factory=dict)  # message_id -> publish time (ns)
    acked: dict[str, int] = field(default_factory=dict)  # message_id -> PUBACK time (ns)
    refused: int = 0  # PUBACK with a failure reason code
    connects: int = 0


class PacedPublisher:
    """One device connection publishing ``rate`` QoS 1 messages a second for its device ids.

    paho keeps every unacknowledged message and sends it again after each reconnect; with a
    persistent session (clean start off, an expiry) this is the device of docs/mqtt.md 1.
    """

    def __init__(
        self,
        port: int,
        username: str,
        password: str,
        client_id: str,
        device_ids: list[str],
        rate: float,
        payload: Callable[[str, int], bytes] | None = None,
    ) -> None:
        self.device_ids = device_ids
        self.rate = rate
        self._payload = payload or _payload
        self.counts = PublisherCounts()
        self._mid_to_id: dict[int, str] = {}
        self._early: dict[int, bool] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = time.time_ns() // 1_000_000
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(username, password)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        self._port = port

    def _on_connect(self, *args: Any) -> None:
        self.counts.connects += 1

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, reason: Any, props: Any
    ) -> None:
        # paho's network thread calls this holding paho's own locks, so the publishing thread
        # never holds self._lock while inside paho (that would deadlock); a PUBACK can therefore
        # arrive before the publishing thread has recorded which message the mid is.
        with self._lock:
            message_id = self._mid_to_id.pop(mid, None)
            if message_id is None:
                self._early[mid] = getattr(reason, "is_failure", False)
                return
            self._settle(message_id, getattr(reason, "is_failure", False))

    def _settle(self, message_id: str, failed: bool) -> None:
        if failed:
            self.counts.refused += 1
        else:
            self.counts.acked[message_id] = time.monotonic_ns()

    def connect(self) -> None:
        session = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        session.SessionExpiryInterval = 3600
        self.client.connect(
            "127.0.0.1", self._port, keepalive=30, clean_start=False, properties=session
        )
        self.client.loop_start()
        eventually_sync(
            self.client.is_connected,
            timeout_s=10.0,
            interval_s=0.02,
            what="the publisher to connect",
        )

    def start(self, seconds: float) -> None:
        self._thread = threading.Thread(target=self._run, args=(seconds,), daemon=True)
        self._thread.start()

    def _run(self, seconds: float) -> None:
        interval = 1.0 / self.rate
        started = time.monotonic()
        n = 0
        while not self._stop.is_set():
            due = started + n * interval
            if due - started >= seconds:
                break
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            device = self.device_ids[n % len(self.device_ids)]
            self._seq += 1
            body = self._payload(device, self._seq)
            message_id = json.loads(body)["message_id"]
            with self._lock:
                self.counts.published[message_id] = time.monotonic_ns()
            info = self.client.publish(f"vigil/v1/dev/{device}/temperature", body, qos=1)
            with self._lock:
                if info.mid in self._early:
                    self._settle(message_id, self._early.pop(info.mid))
                else:
                    self._mid_to_id[info.mid] = message_id
            n += 1

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def all_acked(self) -> bool:
        with self._lock:
            return len(self.counts.acked) + self.counts.refused >= len(self.counts.published)

    def close(self) -> None:
        self._stop.set()
        self.join()
        self.client.disconnect()
        self.client.loop_stop()


class ShareSubscriber:
    """An ingest-like consumer: MQTT 5 persistent session on the shared subscription."""

    def __init__(
        self,
        port: int,
        username: str,
        password: str,
        client_id: str = "vigil-ingest-1",
        reconnect_max_s: int = 1,
    ) -> None:
        self.received: dict[str, int] = {}  # message_id -> first receipt (ns)
        self.copies = 0
        self.connects = 0
        self.subacks = 0
        self.session_present: list[bool] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(min_delay=1, max_delay=reconnect_max_s)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self._port = port

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: Any, reason: Any, props: Any
    ) -> None:
        if getattr(reason, "is_failure", False):
            return
        self.connects += 1
        self.session_present.append(bool(flags.session_present))
        client.subscribe(SHARED_TOPIC, qos=1)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, reasons: Any, props: Any
    ) -> None:
        self.subacks += 1

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        message_id = json.loads(message.payload)["message_id"]
        with self._lock:
            self.copies += 1
            self.received.setdefault(message_id, time.monotonic_ns())

    def connect(self) -> None:
        session = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        session.SessionExpiryInterval = 7 * 24 * 3600
        self.client.connect(
            "127.0.0.1", self._port, keepalive=30, clean_start=False, properties=session
        )
        self.client.loop_start()
        # paho gives no blocking subscribe in the threaded loop: wait for the SUBACK.
        eventually_sync(
            lambda: self.subacks > 0,
            timeout_s=10.0,
            interval_s=0.02,
            what="the subscriber's SUBACK",
        )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class FaultFigures:
    fault: str
    published: int
    acked: int
    refused: int
    received: int
    lost_acked: list[str]
    duplicates: int
    resume_s: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "fault": self.fault,
            "published": self.published,
            "acked": self.acked,
            "refused": self.refused,
            "received": self.received,
            "unacked": self.published - self.acked - self.refused,
            "lost_acked": len(self.lost_acked),
            "duplicates": self.duplicates,
            "resume_s": self.resume_s,
            **self.extra,
        }


def figures(
    fault: str,
    pub: PacedPublisher,
    sub: ShareSubscriber,
    fault_at_ns: int | None,
    back_at_ns: int | None = None,
) -> FaultFigures:
    acked = set(pub.counts.acked)
    lost = sorted(acked - set(sub.received))
    resume = None
    if fault_at_ns is not None:
        # Seconds from the fault to the first message reaching the subscriber once the broker
        # (and, when it was away, the subscriber) is back.
        since = back_at_ns or fault_at_ns
        after = [t for t in sub.received.values() if t > since]
        if after:
            resume = round((min(after) - fault_at_ns) / 1e9, 2)
    extra: dict[str, Any] = {}
    if lost and fault_at_ns is not None:
        # When the lost messages were published, in seconds before the fault (negative: after).
        before = [(fault_at_ns - pub.counts.published[m]) / 1e9 for m in lost]
        extra["lost_published_s_before_fault"] = [round(min(before), 2), round(max(before), 2)]
    return FaultFigures(
        fault=fault,
        published=len(pub.counts.published),
        acked=len(acked),
        refused=pub.counts.refused,
        received=len(sub.received),
        lost_acked=lost,
        duplicates=sub.copies - len(sub.received),
        resume_s=resume,
        extra=extra,
    )


@dataclass
class Scenario:
    # "graceful" / "sigkill": the broker stopped with SIGTERM / SIGKILL while ingest is connected;
    # "offline-restart" / "offline-sigkill": the same while ingest is away.
    fault: str
    rate: float = 200.0
    seconds: float = 12.0
    fault_after_s: float = 4.0
    broker_down_s: float = 2.0
    subscriber_away_s: float = 60.0
    drain_timeout_s: float = 30.0
    broker: dict[str, Any] = field(default_factory=dict)  # StackSettings overrides


@dataclass
class Run:
    broker: OwnBroker
    publisher: PacedPublisher
    subscriber: ShareSubscriber


def run_scenario(data_dir: Path, scenario: Scenario) -> FaultFigures:
    """Start a broker, a subscriber and a publisher, inject ``scenario.fault``, drain, count."""
    broker = OwnBroker(data_dir, **scenario.broker)
    broker.start()
    secrets = broker.secrets
    sub = ShareSubscriber(broker.port, INGEST_MQTT_USER, secrets.mqtt_ingest_password)
    pub = PacedPublisher(
        broker.port,
        SIM_MQTT_USER,
        secrets.mqtt_sim_password,
        f"fault-hub-{uuid.uuid4().hex[:6]}",
        [f"fault-dev-{i}" for i in range(4)],
        scenario.rate,
    )
    fault_at = back_at = None
    try:
        sub.connect()
        pub.connect()
        pub.start(scenario.seconds)
        time.sleep(scenario.fault_after_s)
        if scenario.fault in ("offline-restart", "offline-sigkill"):
            # Ingest away (a clean disconnect: its session stays), the broker restarted while it
            # is away, ingest back after ``subscriber_away_s``.
            sub.close()
            time.sleep(1.0)
            fault_at = time.monotonic_ns()
            broker.stop(signal.SIGKILL if scenario.fault == "offline-sigkill" else signal.SIGTERM)
            time.sleep(scenario.broker_down_s)
            broker.start()
            time.sleep(max(0.0, scenario.subscriber_away_s - scenario.broker_down_s - 1.0))
            back_at = time.monotonic_ns()
            sub = _reconnect(broker, sub)
        else:
            fault_at = time.monotonic_ns()
            broker.stop(signal.SIGKILL if scenario.fault == "sigkill" else signal.SIGTERM)
            time.sleep(scenario.broker_down_s)
            back_at = time.monotonic_ns()
            broker.start()
        pub.join()
        # A message never acknowledged is the publisher's to keep; counted as "unacked".
        with contextlib.suppress(TimeoutError):
            eventually_sync(
                pub.all_acked,
                timeout_s=scenario.drain_timeout_s,
                interval_s=0.02,
                what="every message to be acknowledged",
            )
        acked = set(pub.counts.acked)
        # Whatever has not arrived by then is counted as lost.
        with contextlib.suppress(TimeoutError):
            eventually_sync(
                lambda: acked <= set(sub.received),
                timeout_s=10.0,
                interval_s=0.02,
                what="acknowledged messages to arrive",
            )
        return figures(scenario.fault, pub, sub, fault_at, back_at)
    finally:
        pub.close()
        sub.close()
        broker.stop(signal.SIGTERM)


def _reconnect(broker: OwnBroker, old: ShareSubscriber) -> ShareSubscriber:
    """Ingest back with the same client id: a new process, the same session."""
    new = ShareSubscriber(broker.port, INGEST_MQTT_USER, broker.secrets.mqtt_ingest_password)
    new.received = old.received
    new.copies = old.copies
    new.connect()
    return new


def _iter_faults(names: str) -> Iterator[str]:
    yield from (name.strip() for name in names.split(",") if name.strip())


def main() -> None:
    global SHARED_TOPIC
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", default="graceful,sigkill,offline-restart")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--away-s", type=float, default=60.0)
    parser.add_argument("--topic", default=SHARED_TOPIC, help="the subscriber's subscription")
    parser.add_argument("--autosave-interval", type=int, default=None)
    parser.add_argument("--autosave-on-changes", choices=("true", "false"), default=None)
    args = parser.parse_args()
    # `timeout` and Ctrl-C stop the run through its finally blocks, which stop its broker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    SHARED_TOPIC = args.topic
    broker: dict[str, Any] = {}
    if args.autosave_interval is not None:
        broker["mqtt_autosave_interval"] = args.autosave_interval
    if args.autosave_on_changes is not None:
        broker["mqtt_autosave_on_changes"] = args.autosave_on_changes == "true"
    for fault in _iter_faults(args.faults):
        scenario = Scenario(
            fault=fault,
            rate=args.rate,
            seconds=(
                max(args.seconds, args.away_s + 6) if fault.startswith("offline") else args.seconds
            ),
            subscriber_away_s=args.away_s,
            broker=broker,
        )
        with tempfile.TemporaryDirectory(prefix="vigil-broker-fault-") as tmp:
            os.chmod(tmp, 0o755)
            result = run_scenario(Path(tmp), scenario)
        line = {**result.as_json(), "topic": SHARED_TOPIC, "rate": args.rate, **broker}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
