"""``vigil run`` (what ``make run`` starts on a fresh clone), as a user runs it, on a stack of its
own: the simulated fever is paged by e-mail, the acknowledgement link in that e-mail answers,
acknowledging there stops the escalation, the care-team API serves the pipeline's outages
to the demo user's login (notify's API serves only the links and Twilio's webhooks), and a
device the demo user registers through the API (the dashboard's form sends the same request)
connects over TLS with the password in the answer and its reading is stored for its patient.

The run gets a fresh stack in a temporary folder on ports of its own (26xxx), so its services,
consumer groups and registry never meet the test stack's; it is stopped and deleted at the end.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.factories import temperature_message
from tests.polling import eventually_sync
from vigil_tools.localrun import DEMO_USER
from vigil_tools.simulator.fleet import patient_id_for
from vigil_tools.stack import StackSettings, down

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]
STACK_PORTS = {
    "VIGIL_STACK_MQTT_PORT": "26883",  # TLS on 26884
    "VIGIL_STACK_KAFKA_PORT": "26092",
    "VIGIL_STACK_KAFKA_CONTROLLER_PORT": "26093",
    "VIGIL_STACK_PG_PORT": "26432",
    "VIGIL_STACK_SMTP_PORT": "26025",
}
SERVICE_PORTS = {
    "VIGIL_API_PORT": "26080",
    "VIGIL_NOTIFY_API_PORT": "26085",
    "VIGIL_INGEST_METRICS_PORT": "26101",
    "VIGIL_RULES_OPS_PORT": "26102",
    "VIGIL_NOTIFY_OPS_PORT": "26103",
}
ACK_LINE = re.compile(r"ACKNOWLEDGE \(stops further paging\): (\S+)")
FEVER_PATIENT = patient_id_for(1)  # the default scenario's fever


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """The stack's folder (not yet created, as on a fresh clone) inside a temporary one."""
    base = Path(tempfile.mkdtemp(prefix="vigil-run-"))
    data_dir = base / "stack"
    yield data_dir
    down(StackSettings(data_dir=data_dir, **_stack_fields()), purge=True)
    shutil.rmtree(base, ignore_errors=True)


def _stack_fields() -> dict[str, int]:
    return {
        name.removeprefix("VIGIL_STACK_").lower(): int(value) for name, value in STACK_PORTS.items()
    }


def _environment(data_dir: Path) -> dict[str, str]:
    """The caller's environment without anything Vigil (the test stack's addresses above all),
    as in a fresh shell, plus this run's stack folder and ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
    env.update(STACK_PORTS)
    env.update(SERVICE_PORTS)
    env["VIGIL_STACK_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _pages_with_ack_link(mail_dir: Path) -> list[tuple[str, str]]:
    """(subject, ack link) of every e-mail about the fever patient that carries a link."""
    found = []
    for path in sorted(mail_dir.glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        body = message.get_body(preferencelist=("plain",))
        text = body.get_content() if body is not None else ""
        link = ACK_LINE.search(text)
        if link and FEVER_PATIENT in text:
            found.append((str(message["Subject"]), link.group(1)))
    return found


def _http(
    url: str,
    *,
    data: bytes | None = None,
    token: str | None = None,
    json_body: dict[str, str] | None = None,
) -> tuple[int, str]:
    if json_body is not None:
        data = json.dumps(json_body).encode()
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if json_body is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()


async def _escalation_of_fever(dsn: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow(
            """
            SELECT e.status, e.acknowledged_by FROM escalations e
            JOIN alerts a USING (alert_id)
            WHERE e.patient_id = $1 AND a.rule_id = 'fever'
            ORDER BY e.opened_at LIMIT 1
            """,
            FEVER_PATIENT,
        )
    finally:
        await conn.close()


def test_vigil_run_pages_a_fever_whose_ack_link_works(run_dir: Path) -> None:
    env = _environment(run_dir)
    log_path = run_dir.with_name("vigil-run.out")
    with log_path.open("wb") as log:
        run = subprocess.Popen(
            [sys.executable, "-m", "vigil_tools.cli", "run", "--patients", "3"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def output() -> str:
            return log_path.read_text(errors="replace")[-3000:]

        def fever_pages() -> list[tuple[str, str]]:
            if run.poll() is not None:
                pytest.fail(f"vigil run exited with {run.returncode}:\n{output()}")
            return _pages_with_ack_link(run_dir / "mail")

        pages = eventually_sync(
            fever_pages,
            timeout_s=300,
            interval_s=1.0,
            what=f"a fever page for {FEVER_PATIENT} with an acknowledgement link",
            detail=output,
        )
        subject, link = pages[0]
        assert link.startswith(f"http://127.0.0.1:{SERVICE_PORTS['VIGIL_NOTIFY_API_PORT']}/ack/")

        # The link answers: a GET shows the button (and acknowledges nothing) ...
        status, page = _http(link)
        assert status == 200, page
        assert '<form method="post"' in page
        dsn = _stack_dsn(run_dir)
        before = asyncio.run(_escalation_of_fever(dsn))
        assert before is not None and before["status"] == "open", before

        # ... and the POST the button sends acknowledges the escalation.
        status, page = _http(link, data=b"")
        assert status == 200, page
        assert "Acknowledged. Escalation stopped." in page, page
        after = asyncio.run(_escalation_of_fever(dsn))
        assert after is not None and after["status"] == "acknowledged", (subject, after)

        # The pipeline's outages are the care-team API's: the demo user's login reads them,
        # nobody else; notify's API serves only the links (and Twilio's webhooks).
        api = f"http://127.0.0.1:{SERVICE_PORTS['VIGIL_API_PORT']}"
        password = (run_dir / "dashboard-password").read_text().strip()
        login = urllib.parse.urlencode({"username": DEMO_USER, "password": password})
        status, body = _http(f"{api}/auth/token", data=login.encode())
        assert status == 200, body
        token = json.loads(body)["access_token"]
        status, _ = _http(f"{api}/api/pipeline-outages")
        assert status == 401
        status, body = _http(f"{api}/api/pipeline-outages", token=token)
        assert status == 200, body
        assert isinstance(json.loads(body), list)
        notify = f"http://127.0.0.1:{SERVICE_PORTS['VIGIL_NOTIFY_API_PORT']}"
        assert _http(f"{notify}/pipeline-outages")[0] == 404

        # Device onboarding works in the run: the API has the stack's broker accounts.
        device, patient = "thermo-run-new", patient_id_for(3)
        registration = {"device_id": device, "kind": "thermometer", "patient_id": patient}
        status, body = _http(f"{api}/api/devices", json_body=registration, token=token)
        assert status == 201, body
        config = json.loads(body)["configuration"]
        assert config["tls"] is True and config["ca_certificate"], config
        assert _publish_as_device(config) in {"Success", "No matching subscribers"}
        stored = eventually_sync(
            lambda: asyncio.run(_reading_of(dsn, device)),
            timeout_s=60,
            interval_s=0.5,
            what=f"the reading of {device} stored",
            detail=output,
        )
        assert (stored["patient_id"], stored["value_c"]) == (patient, 36.8)
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGINT)
            try:
                run.wait(timeout=60)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait()


def _publish_as_device(config: dict[str, object]) -> str:
    """Connect as the device the API configured (TLS, its id as client id, the password in the
    answer) and publish one temperature; the PUBACK's reason."""
    device = str(config["client_id"])
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
    client.username_pw_set(str(config["username"]), str(config["password"]))
    client.tls_set(ca_certs=str(config["ca_certificate"]))
    connected, acked = threading.Event(), threading.Event()
    reasons: dict[str, str] = {}

    def on_connect(_c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        reasons["connack"] = str(reason)
        connected.set()

    def on_publish(_c: object, _u: object, _m: int, reason: object, _p: object) -> None:
        reasons["puback"] = str(reason)
        acked.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(str(config["host"]), int(str(config["port"])), keepalive=30)
    client.loop_start()
    try:
        assert connected.wait(10), "no CONNACK"
        assert reasons["connack"] == "Success", reasons
        message = temperature_message(device, 36.8, unit="C", site="axillary")
        client.publish(f"{config['topic_prefix']}temperature", json.dumps(message), qos=1)
        assert acked.wait(10), "no PUBACK"
        return reasons["puback"]
    finally:
        client.disconnect()
        client.loop_stop()


async def _reading_of(dsn: str, device_id: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow(
            "SELECT patient_id, value_c FROM temperature_readings WHERE device_id = $1",
            device_id,
        )
    finally:
        await conn.close()


def _stack_dsn(data_dir: Path) -> str:
    from vigil_tools.stack import stack_env

    return stack_env(StackSettings(data_dir=data_dir, **_stack_fields()))["VIGIL_PG_DSN"]
