"""The operations endpoint every service shares: Prometheus metrics, liveness and readiness.

``OpsServer`` is a minimal asyncio HTTP/1.0 server with three paths: ``/metrics`` (the
Prometheus text format of the service's own ``CollectorRegistry``), ``/healthz`` (the event
loop answers) and ``/readyz`` (200 or 503 from the service's readiness callable, with its
reason as the body). It owns no metric and no notion of what "ready" means for a service: each
service passes its registry and its readiness check. It listens on loopback by default;
exposing it further is the deployment's decision.

``Outage`` and ``watch_dependency`` make readiness tell the truth about a dependency the service
is not using at that moment (an idle service does not notice a Kafka outage by failing to
produce): a probe every ``interval_s``, an outage logged once when it starts and once when it
ends, and ``/readyz`` 503 meanwhile. ``kafka_probe`` asks a Kafka broker for its API versions
(a real answer in the Kafka protocol, not only an open port). ``serving_ops`` takes the watches
and runs them for the service's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from vigil.runtime import log_fields

log = logging.getLogger("vigil.ops")

Readiness = Callable[[], tuple[bool, str]]
Probe = Callable[[], Awaitable[None]]


class Outage:
    """Whether one dependency is reachable, from the outcomes of its probes (no I/O, no clock of
    its own: ``now`` comes with each outcome, so tests drive it with plain numbers).

    The first failed probe starts an outage: logged once (``dependency_unavailable``), however
    many probes fail after it; the first successful probe ends it, logged once
    (``dependency_recovered``, with how long it lasted). Before any probe the dependency counts
    as reachable, so a service is not held unready by a watch that has not run yet.
    """

    def __init__(self, name: str, logger: logging.Logger = log) -> None:
        self.name = name
        self._log = logger
        self.up = True
        self.since: float | None = None  # when the current outage started
        self.detail = ""
        self.outages = 0

    def observe(self, ok: bool, now: float, detail: str = "") -> str | None:
        """Record one probe's outcome; returns "outage" or "recovered" on a change, else None."""
        if ok and not self.up:
            lasted = now - (self.since if self.since is not None else now)
            self.up, self.since, self.detail = True, None, ""
            self._log.warning(
                "dependency_recovered",
                extra=log_fields(dependency=self.name, outage_s=round(lasted, 3)),
            )
            return "recovered"
        if not ok and self.up:
            self.up, self.since, self.detail = False, now, detail
            self.outages += 1
            self._log.error(
                "dependency_unavailable", extra=log_fields(dependency=self.name, error=detail)
            )
            return "outage"
        if not ok:
            self.detail = detail
        return None

    def readiness(self) -> tuple[bool, str]:
        if self.up:
            return True, "ready"
        return False, f"{self.name} unreachable: {self.detail}"


async def watch_dependency(
    outage: Outage,
    probe: Probe,
    stop: asyncio.Event,
    *,
    interval_s: float = 2.0,
    timeout_s: float = 3.0,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Probe every ``interval_s`` (each probe bounded by ``timeout_s``) until ``stop``: an
    outage is seen at most ``interval_s + timeout_s`` after it starts."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(probe(), timeout_s)
        except Exception as error:  # any failure of the probe is the dependency's outage
            outage.observe(False, clock(), f"{type(error).__name__}: {error}".strip(": "))
        else:
            outage.observe(True, clock())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


# ApiVersions v0 (api key 18): a request every Kafka broker answers, before any authentication.
_API_VERSIONS = struct.Struct("!ihhih")
_CLIENT_ID = b"vigil-readiness"


async def kafka_probe(bootstrap_servers: str) -> None:
    """Raise unless one of ``bootstrap_servers`` answers an ApiVersions request without error."""
    errors: list[str] = []
    for server in (s.strip() for s in bootstrap_servers.split(",") if s.strip()):
        host, _, port = server.rpartition(":")
        try:
            await _api_versions(host.strip("[]") or "127.0.0.1", int(port))
            return
        except (OSError, ValueError, asyncio.IncompleteReadError) as error:
            errors.append(f"{server}: {type(error).__name__} {error}".strip())
    raise ConnectionError("; ".join(errors) or "no bootstrap server configured")


async def _api_versions(host: str, port: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        correlation = 0x5647  # any value; the answer must echo it
        body = _API_VERSIONS.pack(
            _API_VERSIONS.size - 4 + len(_CLIENT_ID), 18, 0, correlation, len(_CLIENT_ID)
        )
        writer.write(body + _CLIENT_ID)
        await writer.drain()
        size = struct.unpack("!i", await reader.readexactly(4))[0]
        if size < 6:
            raise ValueError(f"ApiVersions answer of {size} bytes")
        answer = await reader.readexactly(size)
        echoed, error_code = struct.unpack("!ih", answer[:6])
        if echoed != correlation:
            raise ValueError("ApiVersions answer for another request")
        if error_code != 0:
            raise ValueError(f"ApiVersions error code {error_code}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def kafka_outage(bootstrap_servers: str) -> tuple[Outage, Probe]:
    """A Kafka watch for ``serving_ops``: the outage and its probe."""
    return Outage("kafka"), lambda: kafka_probe(bootstrap_servers)


def combined(ready: Readiness, outages: Sequence[Outage]) -> Readiness:
    """``ready`` unless a watched dependency is out (the outage's reason comes first)."""

    def check() -> tuple[bool, str]:
        for outage in outages:
            if not outage.up:
                return outage.readiness()
        return ready()

    return check


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
    watches: Sequence[tuple[Outage, Probe]] = (),
    watch_interval_s: float = 2.0,
) -> AsyncIterator[OpsServer | None]:
    """The ops server for the duration of a service's run (None when its port is taken);
    ``listening`` is told the bound port, for tests that ask for port 0. Each of ``watches``
    (see ``kafka_outage``) is probed meanwhile and turns ``/readyz`` 503 while it is out."""
    outages = [outage for outage, _ in watches]
    ops = await start_ops_server(registry, combined(ready, outages), host=host, port=port)
    if ops is not None and listening is not None:
        listening(ops.port)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(watch_dependency(o, p, stop, interval_s=watch_interval_s))
        for o, p in watches
    ]
    try:
        yield ops
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if ops is not None:
            await ops.stop()
