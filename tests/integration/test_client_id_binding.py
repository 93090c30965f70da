"""Client ids bound to accounts, on a real Mosquitto of the test's own with the stack's
configuration (the shared test stack is not touched): a device with a valid password cannot
connect with ingest's client id or another device's, so it cannot close their connections; with
its own id it connects. Checked on accounts added while the broker runs (the plugin's $CONTROL
topic) and again after a restart (the plugin's file written at start)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.broker_faults import OwnBroker, ShareSubscriber
from tests.polling import eventually_sync
from vigil_tools.stack import mosquitto
from vigil_tools.stack.credentials import INGEST_MQTT_USER


@pytest.fixture
def broker() -> Iterator[OwnBroker]:
    path = Path(tempfile.mkdtemp(prefix="vigil-broker-ids-"))
    os.chmod(path, 0o755)  # as root the broker drops to its own user
    own = OwnBroker(path)
    try:
        own.start()
        yield own
    finally:
        own.stop(signal.SIGTERM)
        shutil.rmtree(path, ignore_errors=True)


def connect_reason(port: int, username: str, password: str, client_id: str) -> str:
    """The CONNACK's reason ("Success", "Not authorized", ...) for an MQTT 5 connection."""
    reasons: list[str] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(username, password)

    def on_connect(_c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        reasons.append(str(reason))
        done.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port, keepalive=30, clean_start=True)
    client.loop_start()
    try:
        assert done.wait(10), "no CONNACK"
        return reasons[0]
    finally:
        client.disconnect()
        client.loop_stop()


def publish_one(port: int, device: str, password: str) -> str:
    body = f'{{"message_id": "{uuid.uuid4()}", "device_id": "{device}"}}'
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
    client.username_pw_set(device, password)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        eventually_sync(
            client.is_connected, timeout_s=10, interval_s=0.02, what="the device to connect"
        )
        client.publish(f"vigil/v1/dev/{device}/temperature", body, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    return body.split('"')[3]


def check_binding(broker: OwnBroker, a: str, pw_a: str, b: str) -> None:
    ingest = ShareSubscriber(
        broker.port, INGEST_MQTT_USER, broker.secrets.mqtt_ingest_password, "vigil-ingest-1"
    )
    ingest.connect()
    try:
        # Positive control first: the device's own id works and ingest gets its message.
        assert connect_reason(broker.port, a, pw_a, a) == "Success"
        first = publish_one(broker.port, a, pw_a)
        eventually_sync(
            lambda: first in ingest.received,
            timeout_s=10,
            interval_s=0.02,
            what="ingest to receive the control message",
        )
        # Valid password, someone else's client id: refused.
        assert connect_reason(broker.port, a, pw_a, "vigil-ingest-1") == "Not authorized"
        assert connect_reason(broker.port, a, pw_a, b) == "Not authorized"
        assert connect_reason(broker.port, a, pw_a, f"{a}-2") == "Not authorized"
        # Ingest's session was never taken over: one connection, still delivering.
        second = publish_one(broker.port, a, pw_a)
        eventually_sync(
            lambda: second in ingest.received,
            timeout_s=10,
            interval_s=0.02,
            what="ingest to receive after the attempts",
        )
        time.sleep(0.5)  # a takeover would have made paho reconnect by now
        assert ingest.connects == 1
        assert ingest.client.is_connected()
    finally:
        ingest.close()


def test_a_device_cannot_take_ingests_or_another_devices_client_id(broker: OwnBroker) -> None:
    a, b = f"dev-a-{uuid.uuid4().hex[:6]}", f"dev-b-{uuid.uuid4().hex[:6]}"
    pw_a = broker.add_device(a)
    pw_b = broker.add_device(b)
    check_binding(broker, a, pw_a, b)
    # B's own id works while A is refused it.
    assert connect_reason(broker.port, b, pw_b, b) == "Success"
    # The service account's id is not bound (several ingest processes use their own ids).
    assert (
        connect_reason(
            broker.port, INGEST_MQTT_USER, broker.secrets.mqtt_ingest_password, "vigil-ingest-9"
        )
        == "Success"
    )
    # After a restart the bindings come from the file the stack writes at start.
    broker.stop(signal.SIGTERM)
    broker.start()
    check_binding(broker, a, pw_a, b)
    # A revoked device has no account and no binding left.
    mosquitto.revoke_device_credential(broker.settings, a)
    assert connect_reason(broker.port, a, pw_a, a) != "Success"
    assert a not in mosquitto.dynsec_file(broker.settings).read_text()
