"""vigil_tools.healthcheck, the image's HEALTHCHECK: the port from the service's settings,
200 only."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from vigil.ops import OpsServer
from vigil_tools.healthcheck import check, container_service, health_url


async def test_ready_is_healthy_and_unready_is_not() -> None:
    ready = [True]
    server = OpsServer(CollectorRegistry(), lambda: (ready[0], "why"), 0)
    await server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/readyz"
        assert await asyncio.to_thread(check, url)
        ready[0] = False
        assert not await asyncio.to_thread(check, url)
    finally:
        await server.stop()
    assert not await asyncio.to_thread(check, url, 1.0)  # nothing listening


def test_the_port_is_the_one_the_service_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIGIL_RULES_OPS_PORT", "9912")
    monkeypatch.setenv("VIGIL_INGEST_METRICS_PORT", "9911")
    monkeypatch.setenv("VIGIL_API_PORT", "8088")
    assert health_url("rules") == "http://127.0.0.1:9912/readyz"
    assert health_url("ingest") == "http://127.0.0.1:9911/readyz"
    assert health_url("api") == "http://127.0.0.1:8088/login"
    assert health_url("heartbeat") is None
    with pytest.raises(ValueError, match="unknown service"):
        health_url("nonsense")


def test_the_service_is_read_from_process_one(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"/usr/local/bin/python\0/usr/local/bin/vigil\0notify\0")
    assert container_service(cmdline) == "notify"
    cmdline.write_bytes(b"sleep\x00100\x00")
    with pytest.raises(ValueError, match="no vigil service"):
        container_service(cmdline)
