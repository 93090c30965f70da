"""docker-compose.yml agrees with the code, statically (there is no container engine here): every
Vigil service's command is a `vigil` subcommand with options it accepts, every variable is one
its settings read, the secrets it passes make its production settings valid, ports, hosts and
volumes match what the code and the configuration files use, images are pinned, and every
secret comes from the committed example's names."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.version import Version
from pydantic_settings import BaseSettings

from services.api.settings import ApiSettings
from services.ingest.settings import IngestSettings
from services.notify.settings import NotifySettings
from services.rules.settings import RulesSettings
from vigil.db.storage import StorageSettings
from vigil.settings import PostgresSettings
from vigil_tools.cli import COMMANDS
from vigil_tools.cli import main as vigil_main
from vigil_tools.heartbeat import HeartbeatSettings
from vigil_tools.stack.topics import TOPICS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"

# What each `vigil` subcommand reads from the environment.
COMMAND_SETTINGS: dict[str, list[type[BaseSettings]]] = {
    "ingest": [IngestSettings],
    "rules": [RulesSettings],
    "notify": [NotifySettings],
    "api": [ApiSettings],
    "heartbeat": [HeartbeatSettings],
    "migrate": [PostgresSettings, StorageSettings],
    "register-heartbeat": [PostgresSettings],
}
# Services that serve HTTP, the variable naming their port and the one naming their host.
SERVED = {
    "ingest": ("VIGIL_INGEST_METRICS_PORT", "VIGIL_INGEST_METRICS_HOST"),
    "rules": ("VIGIL_RULES_OPS_PORT", "VIGIL_RULES_OPS_HOST"),
    "api": ("VIGIL_API_PORT", "VIGIL_API_HOST"),
}
VARIABLE = re.compile(r"\$\{(\w+)(?::([?-])([^}]*))?\}")


def env_names(settings: type[BaseSettings]) -> set[str]:
    """Every environment variable a settings class (and the blocks it composes) reads."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, field in settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
            names |= env_names(annotation)
        elif isinstance(field.validation_alias, str):
            names.add(field.validation_alias.upper())
        else:
            names.add(f"{prefix}{name}".upper())
    return names


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(k): v for k, v in compose["services"].items()}


def vigil_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the Vigil image."""
    return {
        name: spec
        for name, spec in services(compose).items()
        if str(spec.get("image", "")).startswith("vigil:")
    }


def command(compose: dict[str, Any], service: str) -> str:
    return str(compose["services"][service]["command"][0])


def service_env(compose: dict[str, Any], service: str) -> dict[str, str]:
    env = compose["services"][service].get("environment", {})
    assert isinstance(env, dict), f"{service}: environment must be a mapping"
    return {str(k): str(v) for k, v in env.items()}


def interpolate(value: str, secrets: dict[str, str]) -> str:
    """Compose's ${NAME:?msg} and ${NAME:-default}, with ``secrets`` as the .env file."""

    def one(match: re.Match[str]) -> str:
        name, kind, rest = match.groups()
        if name in secrets:
            return secrets[name]
        assert kind == "-", f"${{{name}}} has no value and no default"
        return rest

    return VARIABLE.sub(one, value)


def example_names() -> dict[str, str]:
    lines = (COMPOSE_DIR / "env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line and not line.startswith("#")]
    return {name: value for name, value in pairs}


def fake_secrets() -> dict[str, str]:
    """A filled-in .env: every name of the example with a 40-character value (URL-safe), a
    port number for a port."""
    return {
        name: "587" if name.endswith("_PORT") else f"{name.lower()}-{'s' * 40}"[:40]
        for name in example_names()
    }


def test_compose_defines_the_whole_system(compose: dict[str, Any]) -> None:
    assert {
        "mosquitto",
        "mosquitto-accounts",
        "kafka",
        "kafka-topics",
        "timescaledb",
        "migrate",
        "register-heartbeat",
        "ingest-1",
        "ingest-2",
        "rules",
        "notify",
        "api",
        "heartbeat",
    } == set(services(compose))


def test_every_vigil_command_is_a_cli_subcommand_with_options_it_accepts(
    compose: dict[str, Any],
) -> None:
    """`vigil <command> --help` lists every option the compose command passes (asked only of
    commands given arguments: ingest and rules read none and would start)."""
    for name, spec in vigil_services(compose).items():
        command = [str(part) for part in spec["command"]]
        assert command[0] in COMMANDS, f"{name}: {command[0]} is not a vigil subcommand"
        assert command[0] in COMMAND_SETTINGS, f"{name}: no settings known for {command[0]}"
        if len(command) == 1:
            continue
        help_args = [command[0]] + ([command[1]] if command[0] == "api" else []) + ["--help"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            vigil_main(help_args)
        assert done.value.code == 0
        for option in (part for part in command[1:] if part.startswith("--")):
            assert option in out.getvalue(), f"{name}: vigil {command[0]} has no {option}"


@pytest.mark.parametrize(
    "service",
    [
        "migrate",
        "register-heartbeat",
        "ingest-1",
        "ingest-2",
        "rules",
        "notify",
        "api",
        "heartbeat",
    ],
)
def test_every_variable_is_a_setting_of_its_command(compose: dict[str, Any], service: str) -> None:
    """A variable the code does not read is a typo that would silently keep a default."""
    command = compose["services"][service]["command"][0]
    read: set[str] = set()
    for settings in COMMAND_SETTINGS[command]:
        read |= env_names(settings)
    unknown = set(service_env(compose, service)) - read
    assert not unknown, f"{service} sets variables its settings do not read: {sorted(unknown)}"


@pytest.mark.parametrize(
    "service", ["ingest-1", "ingest-2", "rules", "notify", "api", "heartbeat", "register-heartbeat"]
)
def test_each_service_starts_in_production_with_what_compose_passes(
    compose: dict[str, Any], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment compose builds from a filled-in .env passes the production checks."""
    for key in list(os.environ):
        if key.startswith("VIGIL_"):
            monkeypatch.delenv(key)
    secrets = fake_secrets()
    env = {k: interpolate(v, secrets) for k, v in service_env(compose, service).items()}
    settings_classes = COMMAND_SETTINGS[command(compose, service)]
    if any("VIGIL_ENVIRONMENT" in env_names(settings) for settings in settings_classes):
        assert env["VIGIL_ENVIRONMENT"] == "production"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for settings in settings_classes:
        built: Any = settings()
        if hasattr(built, "environment"):
            assert built.environment == "production"


def test_no_service_runs_in_development(compose: dict[str, Any]) -> None:
    """Every long-running Vigil service says production (the default) in so many words."""
    for name, spec in vigil_services(compose).items():
        if spec["restart"] != "no":
            assert service_env(compose, name)["VIGIL_ENVIRONMENT"] == "production", name
    assert "development" not in (ROOT / "docker-compose.yml").read_text()


def test_every_service_is_told_where_its_infrastructure_is(compose: dict[str, Any]) -> None:
    """Without these a container would look for its peers on its own loopback."""
    secrets = fake_secrets()
    for name in ("ingest-1", "ingest-2", "rules", "notify"):
        env = service_env(compose, name)
        assert env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    for name in ("ingest-1", "ingest-2", "rules", "notify", "api", "register-heartbeat"):
        dsn = interpolate(service_env(compose, name)["VIGIL_PG_DSN"], secrets)
        assert dsn.startswith("postgresql://vigil_app:"), f"{name} must use the services' role"
        assert dsn.endswith("@timescaledb:5432/vigil")
    for name in ("ingest-1", "ingest-2", "heartbeat"):
        env = service_env(compose, name)
        assert (env["VIGIL_MQTT_HOST"], env["VIGIL_MQTT_PORT"]) == ("mosquitto", "8883")


def test_migrate_runs_as_the_owner_and_grants_the_services_role(compose: dict[str, Any]) -> None:
    migrate = compose["services"]["migrate"]
    assert migrate["command"] == ["migrate", "--grant-to", "vigil_app"]
    assert migrate["restart"] == "no"
    assert service_env(compose, "migrate")["VIGIL_PG_DSN"].startswith("postgresql://vigil_owner:")
    init = (COMPOSE_DIR / "postgres-init.sh").read_text()
    for role in ("vigil_owner", "vigil_app"):
        assert re.search(
            rf"CREATE ROLE {role} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE", init
        )
    assert "ALTER DATABASE vigil OWNER TO vigil_owner" in init
    mounts = compose["services"]["timescaledb"]["volumes"]
    assert (
        "./deploy/compose/postgres-init.sh:/docker-entrypoint-initdb.d/010_vigil_roles.sh:ro"
        in mounts
    )
    for name in ("ingest-1", "rules", "notify", "api"):
        assert compose["services"][name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }


def test_two_ingest_processes_share_one_group_with_their_own_sessions(
    compose: dict[str, Any],
) -> None:
    one, two = service_env(compose, "ingest-1"), service_env(compose, "ingest-2")
    assert one["VIGIL_INGEST_MQTT_SHARE_GROUP"] == two["VIGIL_INGEST_MQTT_SHARE_GROUP"]
    assert one["VIGIL_INGEST_MQTT_CLIENT_ID"] != two["VIGIL_INGEST_MQTT_CLIENT_ID"]


def test_served_ports_bind_every_interface_and_match_healthchecks(compose: dict[str, Any]) -> None:
    """Inside a container, loopback is unreachable from Prometheus and the proxy."""
    for name, spec in vigil_services(compose).items():
        if spec["restart"] == "no":  # one-shots
            continue
        run = spec["command"][0]
        test = spec["healthcheck"]["test"]
        assert test == ["CMD", "python", "-m", "vigil_tools.healthcheck", run], name
        if run in SERVED:
            port_var, host_var = SERVED[run]
            env = service_env(compose, name)
            assert env[host_var] == "0.0.0.0", f"{name}: {host_var}"
            assert int(env[port_var]) > 0
    notify = service_env(compose, "notify")
    assert notify["VIGIL_NOTIFY_API_HOST"] == "0.0.0.0"
    assert notify["VIGIL_NOTIFY_API_ENABLED"] == "true"
    assert compose["services"]["notify"]["ports"] == [f"{notify['VIGIL_NOTIFY_API_PORT']}:8085"]
    api = service_env(compose, "api")
    assert compose["services"]["api"]["ports"] == [f"{api['VIGIL_API_PORT']}:8080"]
    assert notify["VIGIL_NOTIFY_PUBLIC_BASE_URL"].startswith("${")  # from .env, never loopback


def test_self_watch_is_wired(compose: dict[str, Any]) -> None:
    """The heartbeat device notify watches is the one the publisher and the register use."""
    beat = service_env(compose, "heartbeat")["VIGIL_HEARTBEAT_DEVICE_ID"]
    notify = service_env(compose, "notify")
    assert notify["VIGIL_NOTIFY_HEARTBEAT_SOURCES"] == f'["{beat}"]'
    register = compose["services"]["register-heartbeat"]["command"]
    assert (
        register[register.index("--care-team-id") + 1]
        == (notify["VIGIL_NOTIFY_TECHNICAL_CARE_TEAM_ID"])
    )
    assert "--device-id" not in register and beat == "heartbeat-pipeline"  # the default
    accounts = compose["services"]["mosquitto-accounts"]["command"][0]
    assert f"passwd {beat} " in accounts and "passwd vigil-ingest " in accounts


def test_mosquitto_is_tls_only_and_the_services_trust_its_ca(compose: dict[str, Any]) -> None:
    conf = (COMPOSE_DIR / "mosquitto.conf").read_text()
    listeners = re.findall(r"^listener (.+)$", conf, re.MULTILINE)
    assert listeners == ["8883"]
    assert re.search(r"^certfile /mosquitto/config/tls/", conf, re.MULTILINE)
    assert re.search(r"^allow_anonymous false$", conf, re.MULTILINE)
    assert compose["services"]["mosquitto"]["ports"] == ["8883:8883"]
    for name, variable in (
        ("ingest-1", "VIGIL_INGEST_MQTT_TLS_CA_FILE"),
        ("ingest-2", "VIGIL_INGEST_MQTT_TLS_CA_FILE"),
        ("heartbeat", "VIGIL_HEARTBEAT_MQTT_TLS_CA_FILE"),
    ):
        ca = service_env(compose, name)[variable]
        assert f"./deploy/compose/tls/ca.crt:{ca}:ro" in compose["services"][name]["volumes"]


def test_volumes_hold_what_the_programs_write(compose: dict[str, Any]) -> None:
    """Kafka's log dirs, Mosquitto's persistence and password file are on named volumes."""
    declared = set(compose["volumes"])
    for name, spec in services(compose).items():
        for mount in spec.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("./"):
                if not source.startswith("./deploy/compose/tls"):  # the operator's certificates
                    assert (ROOT / source).exists(), f"{name}: {source} is not in the repository"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    kafka = compose["services"]["kafka"]
    assert f"kafka-data:{kafka['environment']['KAFKA_LOG_DIRS']}" in kafka["volumes"]
    conf = (COMPOSE_DIR / "mosquitto.conf").read_text()
    data = re.search(r"^persistence_location (\S+?)/?$", conf, re.MULTILINE)
    passwd = re.search(r"^password_file (\S+)/passwd$", conf, re.MULTILINE)
    assert data and passwd
    assert f"mosquitto-data:{data.group(1)}" in compose["services"]["mosquitto"]["volumes"]
    assert f"mosquitto-accounts:{passwd.group(1)}" in compose["services"]["mosquitto"]["volumes"]
    pg = compose["services"]["timescaledb"]["volumes"]
    assert "pg-data:/var/lib/postgresql/data" in pg


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, spec in services(compose).items():
        image = str(spec["image"])
        repository, _, tag = image.rpartition(":")
        assert repository and re.match(r"\d+\.\d+", tag), f"{name}: {image} is not pinned"


def test_secrets_come_from_the_committed_example_without_values() -> None:
    """Every ${NAME} compose reads is in env.example, empty; the example has no other names."""
    text = (ROOT / "docker-compose.yml").read_text()
    used = {match.group(1) for match in VARIABLE.finditer(text)}
    example = example_names()
    assert set(example) == used
    assert all(value == "" for value in example.values())
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def test_compose_creates_the_same_topics_as_the_local_stack(compose: dict[str, Any]) -> None:
    """Topic names, partitions and retention in compose match vigil_tools/stack/topics.py."""
    script = compose["services"]["kafka-topics"]["command"][0]
    created = {
        parts[1]: (int(parts[2]), int(parts[3]))
        for line in script.splitlines()
        if (parts := line.split()) and parts[0] == "create" and len(parts) == 4
    }
    expected = {t.name: (t.partitions, t.retention_ms) for t in TOPICS}
    assert created == expected


def test_env_name_walk_sees_nested_blocks_and_the_shared_environment() -> None:
    names = env_names(IngestSettings)
    assert {
        "VIGIL_ENVIRONMENT",
        "VIGIL_INGEST_MQTT_PASSWORD",
        "VIGIL_KAFKA_BOOTSTRAP_SERVERS",
        "VIGIL_PG_DSN",
        "VIGIL_MQTT_HOST",
    } <= names
    assert "VIGIL_INGEST_ENVIRONMENT" not in names


def test_dockerfile_installs_locked_dependencies_before_the_code() -> None:
    lines = [
        line
        for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    copies = [i for i, line in enumerate(lines) if line.startswith("COPY ")]
    install_deps = next(i for i, line in enumerate(lines) if "-r requirements.txt" in line)
    assert lines[copies[0]] == "COPY deploy/requirements.txt ./requirements.txt"
    assert all(install_deps < i for i in copies[1:]), "code copied before the dependencies"
    assert lines[0].startswith("FROM python:3.11.") and "slim" in lines[0]
    assert any(line.startswith("HEALTHCHECK ") for line in lines)
    assert any(line.startswith("USER vigil") for line in lines)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert {".env", ".venv", ".vigil", ".vigil-*", ".git", "tests"} <= set(ignored)


def test_the_lock_pins_every_runtime_dependency_within_pyproject() -> None:
    spec = importlib.util.spec_from_file_location("lock", ROOT / "deploy" / "lock.py")
    assert spec is not None and spec.loader is not None
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    pins = {}
    for line in (ROOT / "deploy" / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = Version(version)
    for requirement in lock.runtime_requirements():
        name = lock.normalize(requirement.name)
        assert name in pins, f"{name} is not pinned in deploy/requirements.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]}"
