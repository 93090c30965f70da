"""The operations endpoint every service shares: Prometheus metrics, liveness and readiness.

``OpsServer`` is a minimal asyncio HTTP/1.0 server with three paths: ``/metrics`` (the
Prometheus text format of the service's own ``CollectorRegistry``), ``/healthz`` (the event
loop answers) and ``/readyz`` (200 or 503 from the service's readiness callable, with its
reason as the body). It owns no metric and no notion of what "ready" means for a service: each
service passes its registry and its readiness check. It listens on loopback by default;
exposing it further is the deployment's decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from vigil.runtime import log_fields

log = logging.getLogger("vigil.ops")

Readiness = Callable[[], tuple[bool, str]]


class OpsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (port 0 picks a free port)."""

    def __init__(self, registry: CollectorRegistry, ready: Readiness, port: int) -> None:
        self._registry = registry
        self._ready = ready
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str = "127.0.0.1") -> None:
        self._server = await asyncio.start_server(self._serve, host, self._port)
        log.info("ops_listening", extra=log_fields(port=self.port))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5.0)
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            status, content_type, body = self._route(path)
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1")
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _route(self, path: str) -> tuple[str, str, bytes]:
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            return "200 OK", "text/plain; charset=utf-8", b"ok\n"
        if path == "/readyz":
            try:
                ready, why = self._ready()
            except Exception as error:  # a broken check must read as "not ready", not crash
                ready, why = False, f"readiness check failed: {type(error).__name__}"
            status = "200 OK" if ready else "503 Service Unavailable"
            return status, "text/plain; charset=utf-8", (why + "\n").encode()
        return "404 Not Found", "text/plain; charset=utf-8", b"not found\n"


async def start_ops_server(
    registry: CollectorRegistry, ready: Readiness, *, host: str, port: int
) -> OpsServer | None:
    """Start an ``OpsServer``; None (logged) when the port cannot be bound.

    Metrics are for operators: a port already taken must never stop a service that pages.
    """
    server = OpsServer(registry, ready, port)
    try:
        await server.start(host)
    except OSError as error:
        log.error("ops_server_unavailable", extra=log_fields(port=port, error=repr(error)))
        return None
    return server


@contextlib.asynccontextmanager
async def serving_ops(
    registry: CollectorRegistry,
    ready: Readiness,
    *,
    host: str,
    port: int,
    listening: Callable[[int], None] | None = None,
) -> AsyncIterator[OpsServer | None]:
    """The ops server for the duration of a service's run (None when its port is taken);
    ``listening`` is told the bound port, for tests that ask for port 0."""
    ops = await start_ops_server(registry, ready, host=host, port=port)
    if ops is not None and listening is not None:
        listening(ops.port)
    try:
        yield ops
    finally:
        if ops is not None:
            await ops.stop()
