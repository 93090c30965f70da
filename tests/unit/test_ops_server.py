"""The shared operations endpoint (``vigil.ops``): metrics, liveness, readiness over HTTP."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from tests.ops_scrape import http_get, parse, value
from vigil.ops import OpsServer, start_ops_server


async def test_serves_the_given_registry_and_follows_the_readiness_callable() -> None:
    """/metrics renders exactly the registry passed in; /readyz is 503 then 200 as the callable
    changes its answer, with its reason as the body; /healthz is 200; other paths 404."""
    registry = CollectorRegistry()
    hits = Counter("vigil_test_hits", "Hits.", ["kind"], registry=registry)
    hits.labels("a").inc(2)
    state = {"ready": False}
    server = OpsServer(registry, lambda: (state["ready"], "waiting for partitions"), 0)
    await server.start()
    try:
        status, body = await http_get(server.port, "/metrics")
        assert status == 200
        assert value(parse(body), "vigil_test_hits_total", kind="a") == 2.0
        assert await http_get(server.port, "/readyz") == (503, "waiting for partitions\n")
        state["ready"] = True
        assert (await http_get(server.port, "/readyz"))[0] == 200
        assert (await http_get(server.port, "/healthz"))[0] == 200
        assert (await http_get(server.port, "/nope"))[0] == 404
    finally:
        await server.stop()


async def test_a_readiness_check_that_raises_reads_as_not_ready() -> None:
    """A broken readiness check answers 503 naming the error, and the server keeps serving."""

    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    server = OpsServer(CollectorRegistry(), broken, 0)
    await server.start()
    try:
        status, body = await http_get(server.port, "/readyz")
        assert status == 503 and "RuntimeError" in body
        assert (await http_get(server.port, "/healthz"))[0] == 200
    finally:
        await server.stop()


async def test_a_taken_port_gives_no_server_instead_of_an_error() -> None:
    """A second server on a port already bound is None (logged), so a service that pages is
    never stopped by its metrics endpoint."""
    first = await start_ops_server(
        CollectorRegistry(), lambda: (True, ""), host="127.0.0.1", port=0
    )
    assert first is not None
    try:
        second = await start_ops_server(
            CollectorRegistry(), lambda: (True, ""), host="127.0.0.1", port=first.port
        )
        assert second is None
    finally:
        await first.stop()
