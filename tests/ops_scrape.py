"""Reading a service's operations endpoint in tests: one plain HTTP GET, and the Prometheus
text parsed into samples, so a test asserts on values rather than on formatting."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families


async def http_get(port: int, path: str) -> tuple[int, str]:
    """Status code and body of ``GET path`` on 127.0.0.1:``port``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text page, keyed by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 for a labelled series not created yet."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def label_values(samples: Samples) -> set[str]:
    """Every label value on the page (to check that none is an identifier)."""
    return {v for _, labels in samples for _, v in labels}


async def scrape(port: int) -> Samples:
    status, body = await http_get(port, "/metrics")
    assert status == 200, body
    return parse(body)
