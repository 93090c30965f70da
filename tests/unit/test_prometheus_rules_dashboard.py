"""The Grafana dashboard (deploy/grafana/dashboards/vigil-pipeline.json) shows the figures the
alerting rules watch: every query names only metrics the services export, with labels they
carry; every metric an alert uses is on it; it reads the Prometheus data source it is given; and
the provisioning file is a valid dashboard provider."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_prometheus_rules import (
    alert_rules,
    exported_metrics,
    metric_names,
    unknown_references,
)

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "vigil-pipeline.json"


def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside rows included; rows themselves are not panels."""
    for item in items:
        if item["type"] == "row":
            yield from panels(item.get("panels", []))
        else:
            yield item


def queries() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in panels(dashboard()["panels"])
        for target in panel["targets"]
    ]


@pytest.mark.parametrize(("title", "expr"), queries(), ids=[q[0] for q in queries()])
def test_every_query_uses_metrics_the_services_export(title: str, expr: str) -> None:
    assert metric_names(expr), f"{title}: a query on no metric"
    assert not unknown_references(expr), f"{title}: {unknown_references(expr)}"


def test_every_metric_an_alert_uses_is_on_the_dashboard() -> None:
    """What pages the on-call is what they look at."""
    shown: set[str] = set()
    for _, expr in queries():
        shown |= set(metric_names(expr))
    alerted: set[str] = set()
    for rule in alert_rules():
        alerted |= set(metric_names(rule["expr"]))
    # The *_created series only date a counter's first event; the counter itself is shown.
    missing = {name for name in alerted - shown if not name.endswith("_created")}
    assert not missing, f"alerted on but not shown: {sorted(missing)}"


def test_the_dashboard_reads_the_data_source_it_is_given() -> None:
    loaded = dashboard()
    assert loaded["uid"] == "vigil-pipeline" and loaded["title"]
    variables = {v["name"]: v for v in loaded["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = []
    for panel in panels(loaded["panels"]):
        ids.append(panel["id"])
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"{panel['title']} has no query"
        assert panel["description"], f"{panel['title']} says nothing of what it shows"
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
    assert len(ids) == len(set(ids))


def test_the_provisioning_file_is_a_dashboard_provider() -> None:
    provisioning = yaml.safe_load((GRAFANA / "provisioning" / "dashboards-vigil.yml").read_text())
    assert provisioning["apiVersion"] == 1
    (provider,) = provisioning["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


def test_the_checker_rejects_a_query_on_a_metric_nobody_exports() -> None:
    """Positive control: a misspelt metric in a dashboard query is reported."""
    assert unknown_references("sum(rate(vigil_ingest_recieved_total[5m]))") == [
        "metric vigil_ingest_recieved_total"
    ]
    assert "vigil_ingest_received_total" in exported_metrics()
