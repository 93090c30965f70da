"""The alerting rules (deploy/prometheus/vigil-alerts.yml) are valid (`promtool check rules`),
behave as their unit tests say (`promtool test rules`: each alert must fire, must not fire, and
the edge), and every expression names only metrics the services export, with labels those
metrics carry. Debian's prometheus package (installed by `make setup`) brings promtool.

``exported_metrics`` and ``metric_names`` are shared with the dashboard's test."""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from services.ingest.adapters.metrics import IngestMetrics
from services.notify.adapters.metrics import NotifyMetrics
from services.rules.adapters.metrics import RulesMetrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "vigil-alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "vigil-alerts.test.yml"
# Labels Prometheus adds to every scraped series, and the series it makes itself.
TARGET_LABELS = {"job", "instance"}
SYNTHETIC = {"up": TARGET_LABELS}
# What the pipeline's alerts must cover (the names the services export them under).
COVERED = {
    "consumer lag": "vigil_rules_consumer_lag",
    "watermark lag": "vigil_rules_watermark_lag_seconds",
    "heartbeat age": "vigil_notify_heartbeat_age_seconds",
    "dead letters": "vigil_ingest_rejected_total",
    "delivery failures": "vigil_notify_delivery_attempts_total",
    "readings lost": "vigil_rules_alerts_emitted_total",
}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_OPERATORS = {"and", "or", "unless", "offset", "bool", "atan2"}
_IDENT = r"[A-Za-z_:][A-Za-z0-9_:]*"
_SELECTOR = re.compile(rf"({_IDENT})?\s*\{{([^}}]*)\}}")
_MATCHER = re.compile(rf"({_IDENT})\s*(=~|!~|!=|=)\s*\"((?:[^\"\\]|\\.)*)\"")


@cache
def exported_metrics() -> dict[str, frozenset[str]]:
    """Every sample name the three services' ops servers export, with its label names (target
    labels included): each metric object, with one child per labelled metric, collected."""
    names: dict[str, set[str]] = {}
    for owner in (IngestMetrics(), RulesMetrics(), NotifyMetrics()):
        for metric in vars(owner).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            labels = metric._labelnames  # the declared label names; no public accessor
            child = metric.labels(*["x"] * len(labels)) if labels else metric
            if hasattr(child, "inc"):
                child.inc()
            for family in metric.collect():
                for sample in family.samples:
                    names.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels | TARGET_LABELS) for name, labels in names.items()} | {
        name: frozenset(labels) for name, labels in SYNTHETIC.items()
    }


def metric_names(expr: str) -> dict[str, set[str]]:
    """The metric names an expression selects, each with the label names it matches on.

    Enough PromQL for these files: selectors ``name{label="v"}``, functions and aggregations
    (an identifier before ``(``), grouping clauses, set operators, ranges and offsets. Grafana's
    variables ($__rate_interval, ${datasource}) are removed first."""
    text = re.sub(r"\$\{\w+\}|\$\w+", "", expr)
    found: dict[str, set[str]] = {}
    # A selector with matchers: keep its name (if any) and its label names.
    for match in _SELECTOR.finditer(text):
        labels = {m.group(1) for m in _MATCHER.finditer(match.group(2))}
        name = match.group(1)
        if name and name not in _KEYWORDS and name not in _OPERATORS:
            found.setdefault(name, set()).update(labels)
        else:
            assert "__name__" not in labels, f"select metrics by name, not __name__: {expr}"
    text = _SELECTOR.sub(lambda m: (m.group(1) or "") + " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\S+", " ", text)
    for match in re.finditer(rf"({_IDENT})(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name in _KEYWORDS or name in _OPERATORS or name.lower() in ("inf", "nan"):
            continue
        if re.fullmatch(r"\d.*", name):
            continue
        found.setdefault(name, set())
    return found


def unknown_references(expr: str) -> list[str]:
    """What in ``expr`` the services do not export: a metric, or a label of a metric."""
    exported = exported_metrics()
    problems = []
    for name, labels in metric_names(expr).items():
        if name not in exported:
            problems.append(f"metric {name}")
        elif labels - exported[name]:
            problems.append(f"{name} has no label {sorted(labels - exported[name])}")
    return problems


def alert_rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: `make setup` installs Debian's prometheus package"
    return found


def test_promtool_checks_the_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=PROMETHEUS_DIR,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_unit_tests_that_fire_it_and_keep_it_quiet() -> None:
    """An alert without a firing case and a quiet case in the .test.yml is untested."""
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} is never seen firing"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} is never quiet"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_every_expression_uses_metrics_the_services_export(rule: dict[str, Any]) -> None:
    assert metric_names(rule["expr"]), "an alert on no metric"
    assert not unknown_references(rule["expr"]), unknown_references(rule["expr"])


def test_the_rules_cover_the_pipeline() -> None:
    used = set()
    for rule in alert_rules():
        used |= set(metric_names(rule["expr"]))
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    missing = {what: name for what, name in COVERED.items() if name not in used}
    assert not missing, f"no alert on {missing}"


def test_the_name_reader_finds_what_an_expression_selects() -> None:
    """The checker itself: names, labels, functions and clauses told apart; an unknown metric
    and an unknown label reported (the positive control of the tests above)."""
    expr = (
        'sum by (job, reason) (increase(vigil_ingest_rejected_total{reason="x"}[10m]) '
        "or (vigil_rules_dead_letters_total and (time() - vigil_rules_dead_letters_created "
        "< 600))) > 0 and on (instance) up == 1"
    )
    assert metric_names(expr) == {
        "vigil_ingest_rejected_total": {"reason"},
        "vigil_rules_dead_letters_total": set(),
        "vigil_rules_dead_letters_created": set(),
        "up": set(),
    }
    assert not unknown_references(expr)
    assert unknown_references("rate(vigil_ingest_rejected[5m])") == ["metric vigil_ingest_rejected"]
    assert unknown_references('vigil_rules_consumer_lag{topic="t"}') == [
        "vigil_rules_consumer_lag has no label ['topic']"
    ]
    assert "vigil_notify_heartbeat_age_seconds" in exported_metrics()
    assert "source" in exported_metrics()["vigil_notify_heartbeat_age_seconds"]
