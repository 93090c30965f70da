"""Readiness that tells the truth about a dependency: the outage state machine (logged once per
outage and once on recovery), the probe loop with a fake probe, the Kafka probe against a fake
Kafka broker, and /readyz of an ops server whose watch sees an outage."""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest
from prometheus_client import CollectorRegistry

from services.ingest.app import subscription
from services.ingest.settings import IngestSettings
from tests.polling import eventually
from vigil.ops import Outage, kafka_probe, serving_ops, watch_dependency

OUTAGE_EVENTS = ("dependency_unavailable", "dependency_recovered")


def events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage() in OUTAGE_EVENTS]


def test_an_outage_is_logged_once_and_its_end_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vigil.ops")
    outage = Outage("kafka")
    assert outage.readiness() == (True, "ready")  # before any probe
    assert outage.observe(True, 0.0) is None
    assert outage.observe(False, 1.0, "refused") == "outage"
    for t in range(2, 12):
        assert outage.observe(False, float(t), "refused again") is None
    ready, why = outage.readiness()
    assert not ready and why == "kafka unreachable: refused again"
    assert outage.observe(True, 12.5) == "recovered"
    assert outage.observe(True, 13.0) is None
    assert outage.readiness() == (True, "ready")
    assert events(caplog) == ["dependency_unavailable", "dependency_recovered"]
    # A second outage is a second pair of lines.
    outage.observe(False, 20.0, "x")
    outage.observe(True, 21.0)
    assert events(caplog) == ["dependency_unavailable", "dependency_recovered"] * 2
    assert outage.outages == 2


async def test_the_probe_loop_sees_an_outage_and_its_end(caplog: pytest.LogCaptureFixture) -> None:
    """A fake probe fails from its 3rd to its 6th call; the watch says so exactly once."""
    caplog.set_level(logging.INFO, logger="vigil.ops")
    calls = 0
    seen: list[bool] = []
    outage = Outage("fake")
    stop = asyncio.Event()

    async def probe() -> None:
        nonlocal calls
        calls += 1
        seen.append(outage.up)
        if 3 <= calls <= 6:
            raise ConnectionRefusedError("nothing listens")
        if calls >= 9:
            stop.set()

    await asyncio.wait_for(watch_dependency(outage, probe, stop, interval_s=0.001), 5)
    assert calls == 9
    # The state before each call: up, up, up, then down from the 3rd failure until the 7th.
    assert seen == [True, True, True, False, False, False, False, True, True]
    assert events(caplog) == ["dependency_unavailable", "dependency_recovered"]


async def test_a_probe_that_hangs_is_an_outage() -> None:
    outage = Outage("slow")
    stop = asyncio.Event()

    async def probe() -> None:
        stop.set()
        await asyncio.sleep(10)

    await asyncio.wait_for(watch_dependency(outage, probe, stop, timeout_s=0.05), 5)
    assert not outage.up and "TimeoutError" in outage.detail


async def fake_kafka(error_code: int = 0, echo: bool = True, port: int = 0) -> asyncio.Server:
    """Answers one ApiVersions v0 request per connection, as a Kafka broker would."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = struct.unpack("!i", await reader.readexactly(4))[0]
        request = await reader.readexactly(size)
        api_key, version, correlation = struct.unpack("!hhi", request[:8])
        assert (api_key, version) == (18, 0)
        body = struct.pack("!ih", correlation if echo else correlation + 1, error_code)
        body += struct.pack("!i", 0)  # no api versions listed
        writer.write(struct.pack("!i", len(body)) + body)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", port)


def port_of(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


async def test_the_kafka_probe_wants_a_kafka_answer() -> None:
    good = await fake_kafka()
    failing = await fake_kafka(error_code=35)
    confused = await fake_kafka(echo=False)
    async with good, failing, confused:
        await kafka_probe(f"127.0.0.1:{port_of(good)}")  # positive control
        # One good bootstrap server among dead ones is enough.
        await kafka_probe(f"127.0.0.1:1,127.0.0.1:{port_of(good)}")
        with pytest.raises(ConnectionError, match="error code 35"):
            await kafka_probe(f"127.0.0.1:{port_of(failing)}")
        with pytest.raises(ConnectionError, match="another request"):
            await kafka_probe(f"127.0.0.1:{port_of(confused)}")
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:1"):
        await kafka_probe("127.0.0.1:1")


async def readyz(port: int) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /readyz HTTP/1.0\r\n\r\n")
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body.strip()


async def test_readyz_turns_503_while_a_watched_dependency_is_out() -> None:
    up = asyncio.Event()
    up.set()

    async def probe() -> None:
        if not up.is_set():
            raise ConnectionRefusedError("refused")

    outage = Outage("kafka")
    ports: list[int] = []
    async with serving_ops(
        CollectorRegistry(),
        lambda: (True, "ready"),
        host="127.0.0.1",
        port=0,
        listening=ports.append,
        watches=[(outage, probe)],
        watch_interval_s=0.01,
    ):
        assert await readyz(ports[0]) == (200, "ready")
        up.clear()
        await eventually(
            lambda: not outage.up, timeout_s=5, interval_s=0.01, what="the outage to be seen"
        )
        assert await readyz(ports[0]) == (503, "kafka unreachable: ConnectionRefusedError: refused")
        up.set()
        await eventually(
            lambda: outage.up, timeout_s=5, interval_s=0.01, what="the recovery to be seen"
        )
        assert await readyz(ports[0]) == (200, "ready")


def test_ingest_subscribes_directly_unless_given_a_share_group() -> None:
    assert subscription(IngestSettings(mqtt_share_group="")) == "vigil/v1/dev/#"
    assert subscription(IngestSettings(mqtt_share_group="g")) == "$share/g/vigil/v1/dev/#"
    assert IngestSettings().mqtt_share_group == ""
