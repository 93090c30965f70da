"""Fault suite: paced QoS 1 readings from a device with an outbox (the end-to-end acknowledgement
of docs/mqtt.md 4.1), through a Mosquitto of the suite's own (the stack's configuration, a
temporary directory, free loopback ports) and real ingest processes, into the test stack's Kafka
and PostgreSQL; one fault after another; one JSON line of figures; exit 1 on any reading that was
acknowledged end to end and is not stored, or any reading never answered.

``python -m tests.fault_suite`` (``make test-faults``). Figures per fault:

- ``published``: distinct readings sent; ``puback``: of those, PUBACKed by the broker;
- ``answered``: answered as stored by ingest (end-to-end acknowledgement); ``resent``: copies
  sent again because no answer came within ``--resend-after-s``;
- ``stored``: distinct readings in ``temperature_readings``; ``lost``: answered yet not stored
  (must be 0); ``unanswered``: still in the outbox at the end (must be 0);
- ``in_kafka_dupes``: not measured here; ``db_duplicates``: rows beyond one per reading (0 by the
  unique key); ``resume_s``: from the fault until the first answer to a reading published after
  the fault was over.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt

from schemas.ack import ACK_PREFIX
from tests.broker_faults import OwnBroker, PacedPublisher, free_port, wait_for
from tests.integration.test_ingest_broker_restart import register
from vigil.simulator.outbox import Outbox
from vigil.stack.credentials import INGEST_MQTT_USER, SIM_MQTT_USER

ROOT = Path(__file__).resolve().parents[1]
TEST_STACK = {
    "VIGIL_STACK_DATA_DIR": str(ROOT / ".vigil-test"),
    "VIGIL_STACK_MQTT_PORT": "21883",
    "VIGIL_STACK_KAFKA_PORT": "29092",
    "VIGIL_STACK_KAFKA_CONTROLLER_PORT": "29093",
    "VIGIL_STACK_PG_PORT": "25432",
    "VIGIL_STACK_SMTP_PORT": "20025",
}
FAULTS = ("graceful", "sigkill", "offline-restart", "ingest-sigkill", "share-sigkill")


def reading(device: str, seq: int) -> bytes:
    return json.dumps(
        {
            "schema": "vigil.device.temperature.v1",
            "message_id": str(uuid.uuid4()),
            "device_id": device,
            "seq": seq,
            "device_time": datetime.now(UTC).isoformat(),
            "value": 37.0,
            "unit": "C",
            "site": "oral",
        }
    ).encode()


class OutboxPublisher(PacedPublisher):
    """The reference hub: PacedPublisher (QoS 1, persistent session, resend after reconnect)
    plus the outbox of docs/mqtt.md 4.1, settled by ingest's answers on vigil/v1/ack/+."""

    def __init__(
        self,
        port: int,
        username: str,
        password: str,
        client_id: str,
        device_ids: list[str],
        rate: float,
        resend_after_s: float,
    ) -> None:
        super().__init__(port, username, password, client_id, device_ids, rate, payload=reading)
        self.outbox = Outbox(resend_after_s)
        self.answered: dict[str, int] = {}  # message_id -> answer time (ns)
        self.rejected = 0
        self._box = threading.Lock()
        self.client.on_message = self._on_answer

        def on_connect(client: mqtt.Client, *args: Any) -> None:
            self._on_connect(client, *args)
            client.subscribe(f"{ACK_PREFIX}/+", qos=1)

        self.client.on_connect = on_connect
        self._resender = threading.Thread(target=self._resend_loop, daemon=True)

    def _on_answer(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        document = json.loads(message.payload)
        now = time.monotonic_ns()
        with self._box:
            settled = self.outbox.settle(document)
            self.rejected += len(settled.rejected)
        for stored in document.get("stored", ()):
            self.answered.setdefault(stored["message_id"], now)

    def publish_one(self, device: str, body: bytes, message_id: str, seq: int) -> None:
        topic = f"vigil/v1/dev/{device}/temperature"
        with self._box:
            self.outbox.add(device, message_id, seq, topic, body, time.monotonic())
        with self._lock:
            self.counts.published[message_id] = time.monotonic_ns()
        info = self.client.publish(topic, body, qos=1)
        with self._lock:
            if info.mid in self._early:
                self._settle(message_id, self._early.pop(info.mid))
            else:
                self._mid_to_id[info.mid] = message_id

    def _run(self, seconds: float) -> None:
        if not self._resender.is_alive():
            self._resender.start()
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
            body = reading(device, self._seq)
            self.publish_one(device, body, json.loads(body)["message_id"], self._seq)
            n += 1

    def _resend_loop(self) -> None:
        while not self._stop.wait(0.5):
            with self._box:
                due = self.outbox.due(time.monotonic())
            for entry in due:
                self.client.publish(entry.topic, entry.payload, qos=1)

    def unanswered(self) -> int:
        with self._box:
            return len(self.outbox)


class Ingest:
    """One ingest process (``vigil ingest``) against the suite's broker."""

    def __init__(self, env: dict[str, str], broker: OwnBroker, client_id: str, group: str) -> None:
        self.ops_port = free_port()
        self.env = {
            **os.environ,
            **env,
            "VIGIL_ENVIRONMENT": "development",
            "VIGIL_MQTT_HOST": "127.0.0.1",
            "VIGIL_MQTT_PORT": str(broker.port),
            "VIGIL_INGEST_MQTT_USERNAME": INGEST_MQTT_USER,
            "VIGIL_INGEST_MQTT_PASSWORD": broker.secrets.mqtt_ingest_password,
            "VIGIL_INGEST_MQTT_CLIENT_ID": client_id,
            "VIGIL_INGEST_MQTT_SHARE_GROUP": group,
            "VIGIL_INGEST_METRICS_PORT": str(self.ops_port),
            "VIGIL_INGEST_LOG_LEVEL": "WARNING",
        }
        self.log = broker.settings.data_dir / f"{client_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vigil.cli", "ingest"],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self.ready, 60.0, "ingest's /readyz")

    def ready(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ops_port}/readyz", timeout=1):
                return True
        except OSError:
            return False

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)
        self.proc = None


async def stored_rows(dsn: str, devices: list[str]) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT message_id::text AS id, count(*) AS n FROM temperature_readings "
            "WHERE device_id = ANY($1) GROUP BY 1",
            devices,
        )
    finally:
        await conn.close()
    return {r["id"]: r["n"] for r in rows}


def run_fault(fault: str, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix=f"vigil-faults-{fault}-"))
    os.chmod(data, 0o755)  # as root the broker drops to its own user
    broker = OwnBroker(data)
    run = uuid.uuid4().hex[:8]
    devices = [f"flt-{run}-{i}" for i in range(4)]
    dsn = env["VIGIL_PG_DSN"]
    asyncio.run(register(dsn, run, devices))
    shared = fault == "share-sigkill"
    group = f"vigil-ingest-{run}" if shared else ""
    ingests = [Ingest(env, broker, f"ingest-{run}-{i}", group) for i in range(2 if shared else 1)]
    publisher = OutboxPublisher(
        0,
        SIM_MQTT_USER,
        "",
        f"hub-{run}",
        devices,
        args.rate,
        resend_after_s=args.resend_after_s,
    )
    started = time.monotonic()
    fault_at = fault_end = time.monotonic_ns()
    try:
        broker.start()
        publisher._port = broker.port
        publisher.client.username_pw_set(SIM_MQTT_USER, broker.secrets.mqtt_sim_password)
        for ingest in ingests:
            ingest.start()
        publisher.connect()
        publisher.start(args.seconds + (args.away_s if fault == "offline-restart" else 0))
        time.sleep(args.seconds / 3)
        fault_at = time.monotonic_ns()
        if fault in ("graceful", "sigkill"):
            broker.stop(signal.SIGTERM if fault == "graceful" else signal.SIGKILL)
            time.sleep(2.0)
            broker.start()
        elif fault == "offline-restart":
            ingests[0].stop()
            time.sleep(1.0)
            broker.stop(signal.SIGTERM)
            time.sleep(2.0)
            broker.start()
            time.sleep(max(0.0, args.away_s - 3.0))
            ingests[0].start()
        elif fault == "ingest-sigkill":
            ingests[0].stop(signal.SIGKILL)
            ingests[0].start()
        elif fault == "share-sigkill":
            for ingest in ingests:
                ingest.stop(signal.SIGKILL)
                ingest.start()
                time.sleep(1.0)
        fault_end = time.monotonic_ns()
        publisher.join()
        wait_for(lambda: publisher.unanswered() == 0, args.settle_s, "every reading answered")
    except TimeoutError:
        pass
    finally:
        publisher.close()
        for ingest in ingests:
            ingest.stop()
        broker.stop(signal.SIGTERM)
    rows = asyncio.run(stored_rows(dsn, devices))
    published = publisher.counts.published
    answered = set(publisher.answered)
    answered_after = [
        publisher.answered[m] for m, t in published.items() if t > fault_end and m in answered
    ]
    figures: dict[str, Any] = {
        "fault": fault,
        "published": len(published),
        "puback": len(publisher.counts.acked),
        "answered": len(answered & set(published)),
        "resent": publisher.outbox.resent,
        "stored": len(set(rows) & set(published)),
        "lost": len(answered - set(rows)),
        "unanswered": publisher.unanswered(),
        "rejected": publisher.rejected,
        "db_duplicates": sum(n - 1 for n in rows.values()),
        "seconds": round(time.monotonic() - started, 1),
    }
    if answered_after:
        figures["resume_s"] = round((min(answered_after) - fault_at) / 1e9, 2)
    shutil.rmtree(data, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fault_suite", description=__doc__)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--away-s", type=float, default=60.0)
    parser.add_argument("--resend-after-s", type=float, default=10.0)
    parser.add_argument("--settle-s", type=float, default=60.0)
    args = parser.parse_args()
    from vigil.stack import StackSettings, up
    from vigil.stack import stack_env as read_env

    for key, value in TEST_STACK.items():
        os.environ.setdefault(key, value)
    settings = StackSettings()
    up(settings)  # the test stack, started if it is not running; never stopped here
    env = read_env(settings)
    results = [run_fault(f, env, args) for f in args.faults.split(",") if f]
    failed = [r["fault"] for r in results if r["lost"] or r["unanswered"] or not r["answered"]]
    print(json.dumps({"faults": results, "failed": failed}), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
