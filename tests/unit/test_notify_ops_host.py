"""Notify's ops server (/metrics, /healthz, /readyz) listens on the interface its settings name:
loopback by default, any interface a deployment chooses (``VIGIL_NOTIFY_OPS_HOST=0.0.0.0`` in
the Helm chart, where Prometheus and the kubelet reach it from outside the pod)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import services.notify.app as notify_app
from services.notify.settings import NotifySettings
from tests.broker_faults import free_port
from vigil.settings import KafkaSettings


async def idle(*args: Any) -> None:
    stop = next(a for a in args if isinstance(a, asyncio.Event))
    await stop.wait()


async def get_status(host: str, port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    return int(raw.split(b" ", 2)[1])


def test_ops_host_defaults_to_loopback_and_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VIGIL_NOTIFY_OPS_HOST", raising=False)
    assert NotifySettings(environment="development").ops_host == "127.0.0.1"
    monkeypatch.setenv("VIGIL_NOTIFY_OPS_HOST", "0.0.0.0")
    assert NotifySettings(environment="development").ops_host == "0.0.0.0"


async def test_the_ops_server_binds_the_configured_interface_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bound to 127.0.0.2 (another loopback address), it answers there and is absent from
    127.0.0.1 at the same port: the setting, not a hard-coded address, decides."""
    monkeypatch.setattr(notify_app, "_serve", idle)
    port = free_port()
    nothing_listens = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    settings = NotifySettings(
        environment="development", ops_host="127.0.0.2", ops_port=port, kafka=nothing_listens
    )
    listening = asyncio.Event()
    stop = asyncio.Event()
    task = asyncio.create_task(
        notify_app.run(settings, stop, listening=lambda _bound: listening.set())
    )
    try:
        await asyncio.wait_for(listening.wait(), 10)
        assert await get_status("127.0.0.2", port, "/healthz") == 200
        assert await get_status("127.0.0.2", port, "/metrics") == 200
        with pytest.raises(ConnectionRefusedError):
            await get_status("127.0.0.1", port, "/healthz")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
