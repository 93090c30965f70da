"""The Helm chart (deploy/helm/vigil) agrees with the code: `helm lint` passes, `helm template`
renders the whole system, refuses what would run it unsafely, and every Vigil container's
command is a `vigil` subcommand whose settings read every variable the chart sets; the
environment the kubelet would build from those variables (secrets filled in) passes each
service's production checks; probes and scrape annotations point at the ports the services'
settings read, on every interface. Helm is the pinned Go module, built once by
deploy/helm/install-helm.sh into .tools/ (git-ignored)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from tests.unit.test_compose import COMMAND_SETTINGS, env_names
from vigil_tools.cli import COMMANDS
from vigil_tools.stack.topics import TOPICS

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "vigil"
EXAMPLE_VALUES = ROOT / "deploy" / "helm" / "example-values.yaml"
KUBE_VERSION = "1.30.0"
# The kubelet's dependent variables: $(NAME) is replaced by an earlier variable's value.
DEPENDENT = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# Services with an ops server: the variables naming its port and its interface.
OPS = {
    "ingest": ("VIGIL_INGEST_METRICS_PORT", "VIGIL_INGEST_METRICS_HOST"),
    "rules": ("VIGIL_RULES_OPS_PORT", "VIGIL_RULES_OPS_HOST"),
    "notify": ("VIGIL_NOTIFY_OPS_PORT", "VIGIL_NOTIFY_OPS_HOST"),
}
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN)$")


@pytest.fixture(scope="module")
def helm() -> str:
    """The pinned helm, built from its Go module on first use (minutes; cached after)."""
    script = ROOT / "deploy" / "helm" / "install-helm.sh"
    version = re.search(r"^HELM_VERSION=(\S+)$", script.read_text(), re.MULTILINE)
    assert version, "install-helm.sh pins no version"
    cached = ROOT / ".tools" / "helm" / version.group(1) / "helm"
    if not cached.exists() and shutil.which("go") is None:
        pytest.skip("Go is not installed: helm is built from its Go module (go install)")
    done = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=1800, check=False
    )
    assert done.returncode == 0, done.stderr
    path = done.stdout.strip().splitlines()[-1]
    assert Path(path) == cached
    return path


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )


def template(helm: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_helm(
        helm,
        "template",
        "vigil",
        str(CHART),
        "-f",
        str(EXAMPLE_VALUES),
        "--kube-version",
        KUBE_VERSION,
        *extra,
    )


@pytest.fixture(scope="module")
def manifests(helm: str) -> list[dict[str, Any]]:
    done = template(helm)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def workloads(manifests: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every workload the chart renders."""
    for manifest in manifests:
        if manifest["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield manifest["metadata"]["name"], manifest["spec"]["template"]["spec"]


def vigil_containers(manifests: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(workload name, container) of every container that runs the Vigil image."""
    for name, pod in workloads(manifests):
        for container in pod["containers"]:
            if container["image"].startswith("vigil:"):
                yield name, container


def container(manifests: list[dict[str, Any]], workload: str) -> dict[str, Any]:
    found = dict(vigil_containers(manifests))
    return found[f"vigil-{workload}"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def fake_secret(ref: dict[str, str]) -> str:
    """A filled-in Secret value: 40 URL-safe characters."""
    return f"{ref['name']}-{ref['key']}-{'s' * 40}"[:40]


def kubelet_env(container: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The environment the kubelet builds, in order: literal values, Secret values, the pod's
    name, and $(NAME) replaced by an earlier variable (an unknown one is left as it is)."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            value = DEPENDENT.sub(lambda m: env.get(m.group(1), m.group(0)), str(entry["value"]))
        elif "secretKeyRef" in entry["valueFrom"]:
            value = fake_secret(entry["valueFrom"]["secretKeyRef"])
        else:
            assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            value = pod_name
        env[entry["name"]] = value
    return env


def settings_of(container: dict[str, Any]) -> list[type[BaseSettings]]:
    command = container["args"][0]
    assert command in COMMANDS, f"{command} is not a vigil subcommand"
    return COMMAND_SETTINGS[command]


def test_helm_is_the_pinned_module_build(helm: str) -> None:
    script = (ROOT / "deploy" / "helm" / "install-helm.sh").read_text()
    assert 'go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"' in script
    assert ".tools/" in (ROOT / ".gitignore").read_text().splitlines()
    version = run_helm(helm, "version", "--short")
    pinned = re.search(r"^HELM_VERSION=v(\d+\.\d+)", script, re.MULTILINE)
    assert pinned and version.stdout.startswith(f"v{pinned.group(1)}"), version.stdout


def test_helm_lint_passes_strictly(helm: str) -> None:
    done = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(EXAMPLE_VALUES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


def test_the_chart_renders_the_whole_system(manifests: list[dict[str, Any]]) -> None:
    assert set(by_kind(manifests, "StatefulSet")) == {"vigil-ingest", "vigil-rules"}
    assert set(by_kind(manifests, "Deployment")) == {"vigil-notify", "vigil-api", "vigil-heartbeat"}
    assert set(by_kind(manifests, "Job")) == {
        "vigil-kafka-topics",
        "vigil-migrate",
        "vigil-register-heartbeat",
    }
    services = by_kind(manifests, "Service")
    assert {"vigil-api", "vigil-notify", "vigil-ingest", "vigil-rules"} == set(services)
    for name in ("vigil-ingest", "vigil-rules"):
        assert by_kind(manifests, "StatefulSet")[name]["spec"]["serviceName"] == name
        assert services[name]["spec"]["clusterIP"] == "None"
    commands = {name: c["args"][0] for name, c in vigil_containers(manifests)}
    assert commands == {
        "vigil-ingest": "ingest",
        "vigil-rules": "rules",
        "vigil-notify": "notify",
        "vigil-api": "api",
        "vigil-heartbeat": "heartbeat",
        "vigil-migrate": "migrate",
        "vigil-register-heartbeat": "register-heartbeat",
    }
    assert container(manifests, "api")["args"] == ["api", "serve"]
    heartbeat = by_kind(manifests, "Deployment")["vigil-heartbeat"]["spec"]
    assert heartbeat["replicas"] == 1 and heartbeat["strategy"] == {"type": "Recreate"}


def test_replicas_come_from_the_values(helm: str) -> None:
    done = template(
        helm, "--set", "ingest.replicas=3,rules.replicas=6,notify.replicas=4,api.replicas=3"
    )
    assert done.returncode == 0, done.stderr
    rendered = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    replicas = {
        m["metadata"]["name"]: m["spec"]["replicas"]
        for m in rendered
        if m["kind"] in ("Deployment", "StatefulSet")
    }
    assert replicas == {
        "vigil-ingest": 3,
        "vigil-rules": 6,
        "vigil-notify": 4,
        "vigil-api": 3,
        "vigil-heartbeat": 1,
    }


@pytest.mark.parametrize(
    "workload", ["ingest", "rules", "notify", "api", "heartbeat", "migrate", "register-heartbeat"]
)
def test_every_variable_is_a_setting_of_its_command(
    manifests: list[dict[str, Any]], workload: str
) -> None:
    """A variable the code does not read is a typo that would silently keep a default; the one
    exception is a variable only expanded into a later one (the DSN's password)."""
    found = container(manifests, workload)
    read: set[str] = set()
    for settings in settings_of(found):
        read |= env_names(settings)
    env = found.get("env", [])
    expanded = {
        name for entry in env if "value" in entry for name in DEPENDENT.findall(entry["value"])
    }
    unknown = {entry["name"] for entry in env} - read - expanded
    assert not unknown, f"{workload} sets variables its settings do not read: {sorted(unknown)}"
    assert not expanded & read, "an expanded helper must not also be a setting"
    for position, entry in enumerate(env):
        for name in DEPENDENT.findall(str(entry.get("value", ""))):
            defined_before = [e["name"] for e in env[:position]]
            assert name in defined_before, f"{workload}: $({name}) is not defined before use"


@pytest.mark.parametrize(
    "workload", ["ingest", "rules", "notify", "api", "heartbeat", "register-heartbeat", "migrate"]
)
def test_each_service_starts_in_production_with_what_the_chart_passes(
    manifests: list[dict[str, Any]], workload: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment the kubelet builds (Secrets filled in) passes the production checks."""
    for key in list(os.environ):
        if key.startswith("VIGIL_"):
            monkeypatch.delenv(key)
    found = container(manifests, workload)
    env = kubelet_env(found, pod_name=f"vigil-{workload}-0")
    assert not any(DEPENDENT.search(value) for value in env.values()), env
    classes = settings_of(found)
    if any("VIGIL_ENVIRONMENT" in env_names(settings) for settings in classes):
        assert env["VIGIL_ENVIRONMENT"] == "production"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for settings in classes:
        built: Any = settings()
        if hasattr(built, "environment"):
            assert built.environment == "production"


def test_every_secret_comes_from_a_secret(manifests: list[dict[str, Any]]) -> None:
    """No password, secret or token is a literal in the rendered manifests."""
    for name, found in vigil_containers(manifests):
        for entry in found.get("env", []):
            if SECRET_NAME.search(entry["name"]):
                assert "secretKeyRef" in entry.get("valueFrom", {}), f"{name}: {entry['name']}"
            if entry["name"] == "VIGIL_PG_DSN":
                assert ":$(PG_PASSWORD)@" in entry["value"], name


def test_migrate_runs_as_the_owner_before_the_services_which_use_the_app_role(
    manifests: list[dict[str, Any]],
) -> None:
    jobs = by_kind(manifests, "Job")
    weights = {}
    for name, job in jobs.items():
        annotations = job["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade", name
        weights[name] = int(annotations["helm.sh/hook-weight"])
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert weights["vigil-kafka-topics"] < weights["vigil-migrate"]
    assert weights["vigil-migrate"] < weights["vigil-register-heartbeat"]
    migrate = container(manifests, "migrate")
    assert migrate["args"] == ["migrate", "--grant-to", "vigil_app"]
    owner = kubelet_env(migrate, "m")["VIGIL_PG_DSN"]
    assert owner.startswith("postgresql://vigil_owner:")
    assert "vigil-postgresql-owner-password" in owner
    for workload in ("ingest", "rules", "notify", "api", "register-heartbeat"):
        dsn = kubelet_env(container(manifests, workload), "p")["VIGIL_PG_DSN"]
        assert dsn.startswith("postgresql://vigil_app:"), f"{workload} must use the services' role"
        assert dsn.endswith("@timescaledb.hospital.example:5432/vigil")
        assert "vigil-postgresql-app-password" in dsn


def test_every_service_is_told_where_its_infrastructure_is(
    manifests: list[dict[str, Any]],
) -> None:
    values = yaml.safe_load(EXAMPLE_VALUES.read_text())
    for workload in ("ingest", "rules", "notify"):
        env = kubelet_env(container(manifests, workload), "p")
        assert env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"] == values["kafka"]["bootstrapServers"]
    for workload in ("ingest", "heartbeat"):
        env = kubelet_env(container(manifests, workload), "p")
        assert (env["VIGIL_MQTT_HOST"], env["VIGIL_MQTT_PORT"]) == ("mqtt.hospital.example", "8883")


def test_ingest_pods_share_one_group_each_with_its_own_session_over_tls(
    manifests: list[dict[str, Any]],
) -> None:
    """A StatefulSet pod's name is stable across restarts, so its MQTT session is too."""
    ingest = container(manifests, "ingest")
    one, two = kubelet_env(ingest, "vigil-ingest-0"), kubelet_env(ingest, "vigil-ingest-1")
    assert one["VIGIL_INGEST_MQTT_SHARE_GROUP"] == two["VIGIL_INGEST_MQTT_SHARE_GROUP"] != ""
    assert (one["VIGIL_INGEST_MQTT_CLIENT_ID"], two["VIGIL_INGEST_MQTT_CLIENT_ID"]) == (
        "vigil-ingest-0",
        "vigil-ingest-1",
    )
    for workload, variable in (
        ("ingest", "VIGIL_INGEST_MQTT_TLS_CA_FILE"),
        ("heartbeat", "VIGIL_HEARTBEAT_MQTT_TLS_CA_FILE"),
    ):
        found = container(manifests, workload)
        ca = Path(kubelet_env(found, "p")[variable])
        mounts = {m["name"]: m["mountPath"] for m in found["volumeMounts"]}
        assert mounts["mqtt-ca"] == str(ca.parent)
        pod = dict(workloads(manifests))[f"vigil-{workload}"]
        volume = next(v for v in pod["volumes"] if v["name"] == "mqtt-ca")
        assert volume["secret"]["items"][0]["path"] == ca.name


def test_each_rules_pod_has_its_own_stable_transactional_id(
    manifests: list[dict[str, Any]],
) -> None:
    rules = container(manifests, "rules")
    assert kubelet_env(rules, "vigil-rules-1")["VIGIL_RULES_TRANSACTIONAL_ID"] == "vigil-rules-1"


def test_probes_and_scraping_use_the_ports_the_settings_read_on_every_interface(
    manifests: list[dict[str, Any]],
) -> None:
    """The kubelet and Prometheus reach a pod from outside it: loopback would not answer."""
    pods = {name: pod for name, pod in workloads(manifests)}
    templates = {
        m["metadata"]["name"]: m["spec"]["template"]
        for m in manifests
        if m["kind"] in ("Deployment", "StatefulSet")
    }
    for workload, (port_var, host_var) in OPS.items():
        found = container(manifests, workload)
        env = kubelet_env(found, "p")
        assert env[host_var] == "0.0.0.0", f"{workload}: {host_var}"
        ports = {p["name"]: p["containerPort"] for p in found["ports"]}
        assert ports["ops"] == int(env[port_var])
        assert found["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
        assert found["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
        assert found["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
        annotations = templates[f"vigil-{workload}"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == env[port_var]
        assert annotations["prometheus.io/path"] == "/metrics"
    api = container(manifests, "api")
    env = kubelet_env(api, "p")
    assert env["VIGIL_API_HOST"] == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in api["ports"]}["http"] == int(
        env["VIGIL_API_PORT"]
    )
    assert api["readinessProbe"]["httpGet"] == {"path": "/login", "port": "http"}
    notify = kubelet_env(container(manifests, "notify"), "p")
    assert notify["VIGIL_NOTIFY_API_HOST"] == "0.0.0.0"
    assert notify["VIGIL_NOTIFY_API_ENABLED"] == "true"
    assert notify["VIGIL_NOTIFY_PUBLIC_BASE_URL"] == "https://vigil-ack.hospital.example"
    assert env["VIGIL_API_COOKIE_SECURE"] == "true"
    assert "vigil-heartbeat" in pods


def test_every_container_requests_resources_and_runs_unprivileged(
    manifests: list[dict[str, Any]],
) -> None:
    for name, pod in workloads(manifests):
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["automountServiceAccountToken"] is False, name
        for found in pod["containers"]:
            requests = found["resources"]["requests"]
            assert {"cpu", "memory"} <= set(requests), name
            assert found["resources"]["limits"]["memory"], name
            assert found["securityContext"]["allowPrivilegeEscalation"] is False, name
            image = str(found["image"])
            assert re.search(r":\d+\.\d+\.\d+$", image), f"{name}: {image} is not pinned"


def test_self_watch_is_wired(manifests: list[dict[str, Any]]) -> None:
    """The heartbeat device notify watches is the one the publisher and the register use."""
    beat = kubelet_env(container(manifests, "heartbeat"), "p")["VIGIL_HEARTBEAT_DEVICE_ID"]
    notify = kubelet_env(container(manifests, "notify"), "p")
    assert notify["VIGIL_NOTIFY_HEARTBEAT_SOURCES"] == f'["{beat}"]'
    register = container(manifests, "register-heartbeat")["args"]
    assert register[register.index("--device-id") + 1] == beat
    assert (
        register[register.index("--care-team-id") + 1]
        == notify["VIGIL_NOTIFY_TECHNICAL_CARE_TEAM_ID"]
    )
    assert register[register.index("--oncall-email") + 1] == "vigil-tech-oncall@hospital.example"


def test_the_topics_job_creates_the_topics_of_the_local_stack(
    manifests: list[dict[str, Any]],
) -> None:
    """Names, partitions, retention and cleanup policy match vigil_tools/stack/topics.py."""
    job = by_kind(manifests, "Job")["vigil-kafka-topics"]
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    created = {
        parts[1]: (int(parts[2]), int(parts[3]), parts[4])
        for line in script.splitlines()
        if (parts := line.split()) and parts[0] == "create" and len(parts) == 5
    }
    expected = {t.name: (t.partitions, t.retention_ms, t.cleanup_policy) for t in TOPICS}
    assert created == expected
    assert "--replication-factor 3" in script and "min.insync.replicas=2" in script
    assert re.search(r":\d+\.\d+\.\d+$", job["spec"]["template"]["spec"]["containers"][0]["image"])


@pytest.mark.parametrize(
    ("unset", "named"),
    [
        ("notify.publicBaseUrl", "notify.publicBaseUrl"),
        ("notify.smtp.host", "notify.smtp.host"),
        ("notify.smtp.from", "notify.smtp.from"),
        ("notify.fallbackEmail", "notify.fallbackEmail"),
        ("heartbeat.techOncallEmail", "heartbeat.techOncallEmail"),
    ],
)
def test_a_required_value_left_empty_refuses_to_render(helm: str, unset: str, named: str) -> None:
    done = template(helm, "--set", f"{unset}=")
    assert done.returncode != 0
    assert f"{named} is required" in done.stderr


def test_unsafe_replica_counts_refuse_to_render(helm: str) -> None:
    """More rules replicas than telemetry partitions, or several ingest replicas without a
    share group (each would receive every message), fail; the edges render."""
    assert template(helm, "--set", "rules.replicas=6").returncode == 0
    too_many = template(helm, "--set", "rules.replicas=7")
    assert too_many.returncode != 0 and "exceeds the telemetry topic's 6 partitions" in (
        too_many.stderr
    )
    assert template(helm, "--set", "ingest.replicas=1,ingest.shareGroup=").returncode == 0
    no_group = template(helm, "--set", "ingest.replicas=2,ingest.shareGroup=")
    assert no_group.returncode != 0 and "ingest.shareGroup is empty" in no_group.stderr


def test_smtp_login_is_optional_and_complete(helm: str) -> None:
    """Without a user name notify gets neither half of the login (its settings refuse one)."""
    done = template(helm, "--set", "notify.smtp.username=")
    assert done.returncode == 0, done.stderr
    rendered = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    env = env_of(container(rendered, "notify"))
    assert "VIGIL_NOTIFY_SMTP_USERNAME" not in env and "VIGIL_NOTIFY_SMTP_PASSWORD" not in env


def test_the_api_manages_device_accounts_through_the_broker_plugin(
    manifests: list[dict[str, Any]], helm: str
) -> None:
    """The API reaches the plugin's admin over TLS at the broker the other services use, its
    password a file from a Secret readable by the pod's group only; devices are told the same
    host unless deviceBroker says otherwise; an empty admin name wires nothing."""
    found = container(manifests, "api")
    env = kubelet_env(found, "p")
    assert env["VIGIL_API_BROKER_ADMIN_USERNAME"] == "vigil-dynsec-admin"
    assert (env["VIGIL_API_BROKER_HOST"], env["VIGIL_API_BROKER_PORT"]) == (
        "mqtt.hospital.example",
        "8883",
    )
    assert "VIGIL_API_DEVICE_BROKER_HOST" not in env
    pod = dict(workloads(manifests))["vigil-api"]
    mounts = {m["name"]: m["mountPath"] for m in found["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    ca = Path(env["VIGIL_API_BROKER_TLS_CA_FILE"])
    assert mounts["mqtt-ca"] == str(ca.parent)
    assert volumes["mqtt-ca"]["secret"]["items"][0]["path"] == ca.name
    secret = Path(env["VIGIL_API_BROKER_ADMIN_PASSWORD_FILE"])
    assert mounts["broker-admin"] == str(secret.parent)
    admin = volumes["broker-admin"]["secret"]
    assert admin["secretName"] == "vigil-mqtt"
    assert admin["items"] == [{"key": "dynsec-admin-password", "path": secret.name}]
    assert admin["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == 10001

    told = template(helm, "--set", "api.deviceBroker.host=mqtt.example,api.deviceBroker.port=443")
    assert told.returncode == 0, told.stderr
    rendered = [doc for doc in yaml.safe_load_all(told.stdout) if doc]
    env = kubelet_env(container(rendered, "api"), "p")
    assert (env["VIGIL_API_DEVICE_BROKER_HOST"], env["VIGIL_API_DEVICE_BROKER_PORT"]) == (
        "mqtt.example",
        "443",
    )
    off = template(helm, "--set", "api.brokerAdmin.username=")
    assert off.returncode == 0, off.stderr
    rendered = [doc for doc in yaml.safe_load_all(off.stdout) if doc]
    assert not any(
        name.startswith("VIGIL_API_BROKER_") for name in env_of(container(rendered, "api"))
    )
    assert "broker-admin" not in {
        v["name"] for v in dict(workloads(rendered))["vigil-api"]["volumes"]
    }


def test_the_kubernetes_scrape_config_finds_the_pods_the_rules_name(
    manifests: list[dict[str, Any]],
) -> None:
    """deploy/prometheus/scrape-kubernetes.yml keeps the chart's annotated pods and names their
    jobs vigil-<component>: exactly the jobs the alerting rules expect."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "scrape-kubernetes.yml").read_text())
    (scrape,) = config["scrape_configs"]
    relabel = {tuple(r["source_labels"]): r for r in scrape["relabel_configs"]}
    name_rule = relabel[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)]
    job_rule = relabel[("__meta_kubernetes_pod_label_app_kubernetes_io_component",)]
    assert job_rule["target_label"] == "job" and job_rule["replacement"] == "vigil-$1"
    scraped = set()
    for manifest in manifests:
        if manifest["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = manifest["spec"]["template"]["metadata"]
        if pod.get("annotations", {}).get("prometheus.io/scrape") == "true":
            assert re.fullmatch(name_rule["regex"], pod["labels"]["app.kubernetes.io/name"])
            scraped.add(f"vigil-{pod['labels']['app.kubernetes.io/component']}")
    rules = (ROOT / "deploy" / "prometheus" / "vigil-alerts.yml").read_text()
    expected = re.search(r'up\{job=~"vigil-\((\w+(?:\|\w+)*)\)"\}', rules)
    assert expected
    assert scraped == {f"vigil-{job}" for job in expected.group(1).split("|")}
