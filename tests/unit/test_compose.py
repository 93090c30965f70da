"""docker-compose.yml agrees with the code: variable names, required connections, topics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from services.ingest.settings import IngestSettings
from services.notify.settings import NotifySettings
from services.rules.settings import RulesSettings
from vigil.stack.topics import TOPICS

ROOT = Path(__file__).resolve().parents[2]
SERVICE_SETTINGS: dict[str, type[BaseSettings]] = {
    "ingest": IngestSettings,
    "rules": RulesSettings,
    "notify": NotifySettings,
}


def env_names(settings: type[BaseSettings]) -> set[str]:
    """Every environment variable a settings class (and the blocks it composes) reads."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, field in settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
            names |= env_names(annotation)
        else:
            names.add(f"{prefix}{name}".upper())
    return names


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def service_env(compose: dict[str, Any], service: str) -> dict[str, str]:
    env = compose["services"][service].get("environment", {})
    assert isinstance(env, dict), f"{service}: environment must be a mapping"
    return {str(k): str(v) for k, v in env.items()}


def test_compose_parses_and_has_every_component(compose: dict[str, Any]) -> None:
    """The file parses and defines the broker, Kafka, TimescaleDB and the three services."""
    assert {"mosquitto", "kafka", "timescaledb", "ingest", "rules", "notify"} <= set(
        compose["services"]
    )
    assert "timescale/timescaledb" in compose["services"]["timescaledb"]["image"]


@pytest.mark.parametrize("service", sorted(SERVICE_SETTINGS))
def test_every_variable_is_a_setting_of_its_service(compose: dict[str, Any], service: str) -> None:
    """A variable the code does not read is a typo that would silently keep a default."""
    unknown = set(service_env(compose, service)) - env_names(SERVICE_SETTINGS[service])
    assert not unknown, f"{service} sets variables its settings do not read: {sorted(unknown)}"


@pytest.mark.parametrize(
    ("service", "required"),
    [
        (
            "ingest",
            {
                "VIGIL_KAFKA_BOOTSTRAP_SERVERS",
                "VIGIL_PG_DSN",
                "VIGIL_MQTT_HOST",
                "VIGIL_INGEST_MQTT_PASSWORD",
            },
        ),
        ("rules", {"VIGIL_KAFKA_BOOTSTRAP_SERVERS", "VIGIL_PG_DSN"}),
        ("notify", {"VIGIL_KAFKA_BOOTSTRAP_SERVERS", "VIGIL_PG_DSN", "VIGIL_NOTIFY_SMTP_HOST"}),
    ],
)
def test_every_service_is_told_where_its_infrastructure_is(
    compose: dict[str, Any], service: str, required: set[str]
) -> None:
    """Without these a container would look for its peers on its own loopback."""
    missing = required - set(service_env(compose, service))
    assert not missing, f"{service} lacks {sorted(missing)}"


def test_env_name_walk_sees_nested_blocks() -> None:
    """The name walk itself: nested blocks contribute their own prefixes."""
    names = env_names(IngestSettings)
    assert {
        "VIGIL_INGEST_MQTT_PASSWORD",
        "VIGIL_KAFKA_BOOTSTRAP_SERVERS",
        "VIGIL_PG_DSN",
        "VIGIL_MQTT_HOST",
    } <= names
    assert "VIGIL_INGEST_KAFKA" not in names


def test_compose_creates_the_same_topics_as_the_local_stack(compose: dict[str, Any]) -> None:
    """Topic names, partitions and retention in compose match vigil/stack/topics.py."""
    script = compose["services"]["kafka-topics"]["command"][0]
    created = {
        parts[1]: (int(parts[2]), int(parts[3]))
        for line in script.splitlines()
        if (parts := line.split()) and parts[0] == "create" and len(parts) == 4
    }
    expected = {t.name: (t.partitions, t.retention_ms) for t in TOPICS}
    assert created == expected
