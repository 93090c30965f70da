"""Ingest operations surface: /metrics, /healthz and /readyz answer over plain HTTP."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Histogram

from services.ingest.adapters.metrics import BatchHistogram, IngestMetrics
from services.ingest.settings import IngestSettings
from vigil.ops import OpsServer


async def get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_metrics_health_and_readiness_endpoints() -> None:
    """Counters appear in Prometheus format; readiness follows the pipeline's state."""
    metrics = IngestMetrics()
    metrics.rejected.labels("invalid_json").inc(3)
    metrics.duplicates.labels("message_id").inc()
    state = {"ready": False}
    server = OpsServer(metrics.registry, lambda: (state["ready"], "why"), 0)
    await server.start()
    try:
        status, body = await get(server.port, "/metrics")
        assert status == 200
        assert 'vigil_ingest_rejected_total{reason="invalid_json"} 3.0' in body
        assert 'vigil_ingest_duplicates_total{kind="message_id"} 1.0' in body
        assert (await get(server.port, "/healthz"))[0] == 200
        assert (await get(server.port, "/readyz"))[0] == 503
        state["ready"] = True
        assert (await get(server.port, "/readyz"))[0] == 200
        assert (await get(server.port, "/nope"))[0] == 404
    finally:
        await server.stop()


def test_metrics_port_defaults_to_9101_and_zero_disables(monkeypatch: pytest.MonkeyPatch) -> None:
    """VIGIL_INGEST_METRICS_PORT configures the server; 0 is accepted as 'off'."""
    monkeypatch.delenv("VIGIL_INGEST_METRICS_PORT", raising=False)
    assert IngestSettings().metrics_port == 9101
    monkeypatch.setenv("VIGIL_INGEST_METRICS_PORT", "0")
    assert IngestSettings().metrics_port == 0


def _histogram_samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def test_a_batch_histogram_exports_what_one_observation_each_leaves() -> None:
    """Amounts below, on and above every bound, zero and past the last one, in batches and one
    at a time: the same bucket and count samples as prometheus_client's ``Histogram`` with one
    ``observe`` per amount, and the same sum but for rounding."""
    amounts = [0.0, 0.01, 0.010001, 0.05, 0.3, 1.0, 59.999, 60.0, 86400.0, 86400.5, 1e9]
    amounts += [i * 0.37 for i in range(500)]
    at_once, one_by_one = CollectorRegistry(), CollectorRegistry()
    buckets = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0, 86400.0)
    together = BatchHistogram("lag", "lag", buckets=buckets, registry=at_once)
    single = Histogram("lag", "lag", buckets=buckets, registry=one_by_one)
    together.observe_each(amounts[:100])
    together.observe_each([])
    together.observe(amounts[100])
    together.observe_each(amounts[101:])
    for amount in amounts:
        single.observe(amount)
    got, expected = _histogram_samples(at_once), _histogram_samples(one_by_one)
    assert got.keys() == expected.keys()
    total = ("lag_sum", "")
    assert got.pop(total) == pytest.approx(expected.pop(total), rel=1e-12)
    assert got == expected
    assert expected[("lag_count", "")] == len(amounts)
