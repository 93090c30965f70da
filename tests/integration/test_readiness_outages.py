"""Ingest's /readyz tells the truth about Kafka and the MQTT broker, end to end: ingest runs
against a Mosquitto of the test's own (stopped and started here), the test stack's PostgreSQL,
and the test stack's Kafka behind a loopback proxy the test cuts (the shared Kafka itself is
never touched). Each outage turns /readyz 503 within 10 s and is logged once; its end turns
/readyz 200 again and is logged once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.ingest.app import run as run_ingest
from services.ingest.settings import IngestSettings
from tests.broker_faults import OwnBroker, free_port
from tests.polling import eventually
from vigil.settings import KafkaSettings, MqttSettings, PostgresSettings
from vigil_tools.stack.credentials import INGEST_MQTT_USER

pytestmark = pytest.mark.stack

DETECT_S = 10.0


class CuttableProxy:
    """Forwards loopback TCP to ``target``; ``cut()`` drops every connection and refuses new
    ones until ``restore()``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


@pytest.fixture
def broker() -> Iterator[OwnBroker]:
    path = Path(tempfile.mkdtemp(prefix="vigil-readyz-"))
    os.chmod(path, 0o755)  # as root the broker drops to its own user
    own = OwnBroker(path)
    try:
        own.start()
        yield own
    finally:
        own.stop(signal.SIGTERM)
        shutil.rmtree(path, ignore_errors=True)


async def readyz(port: int) -> tuple[int, str]:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0, "no ops server"
    writer.write(b"GET /readyz HTTP/1.0\r\n\r\n")
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body.strip()


async def wait_status(port: int, status: int, within_s: float) -> tuple[float, str]:
    started = time.monotonic()
    seen: list[tuple[int, str]] = []

    async def answers() -> bool:
        seen.append(await readyz(port))
        return seen[-1][0] == status

    await eventually(
        answers,
        timeout_s=within_s,
        interval_s=0.1,
        what=f"/readyz to answer {status}",
        detail=lambda: f"still {seen[-1][0]} {seen[-1][1]!r}",
    )
    return time.monotonic() - started, seen[-1][1]


@contextlib.asynccontextmanager
async def running(settings: IngestSettings) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_ingest(settings, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def outage_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (r.getMessage(), str(getattr(r, "fields", {}).get("dependency")))
        for r in caplog.records
        if r.getMessage() in ("dependency_unavailable", "dependency_recovered")
    ]


async def test_ingest_reports_kafka_and_broker_outages(
    stack_env: dict[str, str], broker: OwnBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vigil.ingest")
    kafka_port = int(stack_env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"].rsplit(":", 1)[1])
    proxy = CuttableProxy(kafka_port)
    await proxy.restore()
    ops_port = free_port()
    settings = IngestSettings(
        mqtt_password=broker.secrets.mqtt_ingest_password,
        mqtt_username=INGEST_MQTT_USER,
        mqtt_client_id="vigil-ingest-readyz",
        metrics_port=ops_port,
        kafka_probe_interval_s=1.0,
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{proxy.port}"),
        pg=PostgresSettings(dsn=stack_env["VIGIL_PG_DSN"]),
        mqtt=MqttSettings(host="127.0.0.1", port=broker.port),
    )
    async with running(settings):
        await wait_status(ops_port, 200, 30)  # positive control: ready with everything up

        await proxy.cut()
        took, body = await wait_status(ops_port, 503, DETECT_S)
        assert body.startswith("kafka unreachable"), body
        print(f"kafka outage reported after {took:.1f} s")
        await asyncio.sleep(3)  # several more failed probes: still one line
        await proxy.restore()
        await wait_status(ops_port, 200, DETECT_S)

        await asyncio.to_thread(broker.stop, signal.SIGKILL)
        took, body = await wait_status(ops_port, 503, DETECT_S)
        assert "broker" in body, body
        print(f"broker outage reported after {took:.1f} s")
        await asyncio.sleep(3)  # several reconnect attempts: still one line
        await asyncio.to_thread(broker.start)
        await wait_status(ops_port, 200, DETECT_S)
    assert outage_lines(caplog) == [
        ("dependency_unavailable", "kafka"),
        ("dependency_recovered", "kafka"),
        ("dependency_unavailable", "mqtt broker"),
        ("dependency_recovered", "mqtt broker"),
    ]
