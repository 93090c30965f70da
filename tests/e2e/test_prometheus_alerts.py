"""A real Prometheus (Debian's package, on loopback, its own temporary configuration and
storage, scraping and evaluating every second) scrapes ingest, rules and notify running against
the real stack, loads deploy/prometheus/vigil-alerts.yml, and fires VigilDeadLetters when ingest
dead-letters a message this test publishes; before that, with every target up and the rules
evaluated, the alert is not firing (the positive control). The same Prometheus evaluates every
query of the Grafana dashboard. Bounded in time; Prometheus is stopped at the end."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas.topics import MQTT_PREFIX
from tests.broker_faults import free_port
from tests.e2e.conftest import publish, three_services
from tests.ops_scrape import scrape, value
from tests.polling import eventually, until_ready

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "vigil-alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "vigil-pipeline.json"


@dataclass
class Services:
    ports: dict[str, int]  # job name -> ops port


@pytest.fixture
async def services(stack_env: dict[str, str]) -> AsyncIterator[Services]:
    """Ingest, rules and notify on ops ports of their own, on fresh groups, until /readyz."""
    from services.ingest.settings import IngestSettings
    from services.notify.settings import NotifySettings
    from services.rules.settings import RulesSettings

    run_id = uuid.uuid4().hex[:8]
    ports = {"vigil-ingest": free_port(), "vigil-rules": free_port(), "vigil-notify": free_port()}
    ingest = IngestSettings(
        mqtt_client_id=f"ingest-prom-{run_id}",
        mqtt_share_group=f"ingest-prom-{run_id}",
        metrics_port=ports["vigil-ingest"],
    )
    rules = RulesSettings(
        group_id=f"rules-prom-{run_id}",
        transactional_id=f"rules-prom-{run_id}",
        ops_port=ports["vigil-rules"],
    )
    notify = NotifySettings(group_id=f"notify-prom-{run_id}", ops_port=ports["vigil-notify"])
    async with three_services(stack_env, ingest, rules, notify) as tasks:
        for job, port in ports.items():
            await until_ready(port, what=job, timeout_s=90, tasks=tasks)
        yield Services(ports=ports)


@pytest.fixture
def prometheus(services: Services, tmp_path: Path) -> Any:
    """Prometheus scraping the three services every second, with Vigil's alerting rules."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `make setup` installs Debian's prometheus package"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
            for job, port in services.ports.items()
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()


async def api(base: str, path: str) -> Any:
    """GET a Prometheus API path; None while Prometheus is not answering yet."""

    def get() -> Any:
        try:
            with urllib.request.urlopen(f"{base}{path}", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            return None

    return await asyncio.to_thread(get)


def firing(alerts: Any, name: str, **labels: str) -> list[dict[str, Any]]:
    return [
        alert
        for alert in alerts["data"]["alerts"]
        if alert["labels"]["alertname"] == name
        and alert["state"] == "firing"
        and all(alert["labels"].get(k) == v for k, v in labels.items())
    ]


async def test_a_dead_letter_fires_the_alert_in_a_real_prometheus(
    stack_env: dict[str, str], services: Services, prometheus: str
) -> None:
    """Quiet while every target is up and the rules have been evaluated; firing for ingest's
    first invalid_json dead letter (a series that did not exist before) within a minute."""

    async def targets_up() -> bool | None:
        found = await api(prometheus, "/api/v1/targets")
        if found is None:
            return None
        health = {t["labels"]["job"]: t["health"] for t in found["data"]["activeTargets"]}
        return True if health == dict.fromkeys(services.ports, "up") else None

    await eventually(
        targets_up, timeout_s=60, interval_s=0.25, what="Prometheus scraping all three services"
    )
    scraped_at = time.time()

    async def evaluated() -> bool | None:
        found = await api(prometheus, "/api/v1/rules")
        (group,) = found["data"]["groups"]
        if group["lastEvaluation"].startswith("0001"):
            return None
        names = {rule["name"] for rule in group["rules"]}
        assert "VigilDeadLetters" in names and all(r["health"] == "ok" for r in group["rules"])
        last = group["lastEvaluation"].rstrip("Z")[:26]
        at = datetime.fromisoformat(last).replace(tzinfo=UTC).timestamp()
        return True if at > scraped_at + 1 else None

    await eventually(
        evaluated,
        timeout_s=30,
        interval_s=0.25,
        what="the rules evaluated after the targets came up",
    )
    before = await api(prometheus, "/api/v1/alerts")
    assert not firing(before, "VigilDeadLetters"), before
    assert not firing(before, "VigilServiceDown"), before

    # An unregistered device's garbage: ingest dead-letters it as invalid_json.
    device = f"prom-{uuid.uuid4().hex[:8]}"
    await publish(stack_env, f"{MQTT_PREFIX}/{device}/temperature", b"not json at all")

    async def rejected() -> float | None:
        count = value(
            await scrape(services.ports["vigil-ingest"]),
            "vigil_ingest_rejected_total",
            reason="invalid_json",
        )
        return count if count >= 1 else None

    await eventually(
        rejected, timeout_s=30, interval_s=0.25, what="ingest dead-lettered the message"
    )

    async def alert_fired() -> list[dict[str, Any]] | None:
        alerts = await api(prometheus, "/api/v1/alerts")
        found = firing(alerts, "VigilDeadLetters", job="vigil-ingest", reason="invalid_json")
        return found or None

    (alert,) = await eventually(
        alert_fired, timeout_s=60, interval_s=0.25, what="VigilDeadLetters firing in Prometheus"
    )
    assert alert["labels"]["severity"] == "warning"
    assert "invalid_json" in alert["annotations"]["summary"]
    assert float(alert["value"]) >= 1


async def test_every_dashboard_query_evaluates_in_a_real_prometheus(
    services: Services, prometheus: str
) -> None:
    """Grafana's $__rate_interval given as 1m; each query parses and evaluates, and at least
    one returns series from the running services (positive control: the scrape works)."""
    from tests.unit.test_prometheus_rules_dashboard import queries

    async def scraped() -> bool | None:
        found = await api(prometheus, "/api/v1/query?query=" + urllib.parse.quote("up"))
        if found is None or len(found["data"]["result"]) < len(services.ports):
            return None
        return True

    await eventually(
        scraped, timeout_s=60, interval_s=0.25, what="Prometheus scraping all three services"
    )
    with_data = 0
    for title, expr in queries():
        query = expr.replace("$__rate_interval", "1m")
        found = await api(prometheus, "/api/v1/query?query=" + urllib.parse.quote(query))
        assert found is not None and found["status"] == "success", (title, found)
        with_data += bool(found["data"]["result"])
    assert with_data > 0
