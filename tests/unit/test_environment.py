"""Safe by default: every service runs in production unless VIGIL_ENVIRONMENT=development, and in
production refuses to start without its secrets or with the ones published in the source."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from services.api.settings import DEVELOPMENT_SECRET, ApiSettings
from services.ingest.settings import IngestSettings
from services.notify.settings import DEVELOPMENT_ACK_SECRET, NotifySettings
from services.rules.settings import RulesSettings
from vigil.environment import dsn_password_problem, secret_problem
from vigil_tools.heartbeat import HeartbeatSettings
from vigil_tools.stack import StackSettings, stack_env
from vigil_tools.stack.credentials import ensure_secrets

SECRET = "x" * 40
DSN = "postgresql://vigil_app:a-database-password@timescaledb:5432/vigil"

# Each service's settings with every secret it needs in production (as variables, the way a
# deployment passes them), and the variables its refusal must name when none is set.
SERVICES: dict[str, tuple[type[BaseSettings], dict[str, str], set[str]]] = {
    "ingest": (
        IngestSettings,
        {"VIGIL_INGEST_MQTT_PASSWORD": SECRET, "VIGIL_PG_DSN": DSN},
        {"VIGIL_INGEST_MQTT_PASSWORD", "VIGIL_PG_DSN"},
    ),
    "rules": (RulesSettings, {"VIGIL_PG_DSN": DSN}, {"VIGIL_PG_DSN"}),
    "notify": (
        NotifySettings,
        {"VIGIL_NOTIFY_ACK_SECRET": SECRET, "VIGIL_PG_DSN": DSN},
        {"VIGIL_NOTIFY_ACK_SECRET", "VIGIL_PG_DSN"},
    ),
    "api": (
        ApiSettings,
        {"VIGIL_API_TOKEN_SECRET": SECRET, "VIGIL_PG_DSN": DSN},
        {"VIGIL_API_TOKEN_SECRET", "VIGIL_PG_DSN"},
    ),
    "heartbeat": (
        HeartbeatSettings,
        {"VIGIL_HEARTBEAT_MQTT_PASSWORD": SECRET},
        {"VIGIL_HEARTBEAT_MQTT_PASSWORD"},
    ),
}


@pytest.fixture
def no_vigil_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the VIGIL_* variables the test session or a stack fixture exported."""
    for key in list(os.environ):
        if key.startswith("VIGIL_"):
            monkeypatch.delenv(key)


def build(settings: type[BaseSettings]) -> Any:
    return settings()


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_production_is_the_default_and_refuses_missing_secrets(
    no_vigil_environment: None, service: str
) -> None:
    """With nothing set a service is in production and names every secret it lacks."""
    settings, _, named = SERVICES[service]
    with pytest.raises(ValidationError) as refused:
        build(settings)
    message = str(refused.value)
    assert "refuses to start in production" in message
    for variable in named:
        assert variable in message, f"{service}: {variable} not named in {message}"
    assert "VIGIL_ENVIRONMENT=development" in message


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_production_starts_with_its_secrets(
    no_vigil_environment: None, monkeypatch: pytest.MonkeyPatch, service: str
) -> None:
    settings, secrets, _ = SERVICES[service]
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    built = build(settings)
    assert built.environment == "production"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_production_refuses_each_missing_secret_alone(
    no_vigil_environment: None, monkeypatch: pytest.MonkeyPatch, service: str
) -> None:
    """Leaving out any one secret is enough to refuse, and the refusal names that one."""
    settings, secrets, _ = SERVICES[service]
    for left_out in secrets:
        with monkeypatch.context() as env:
            for key, value in secrets.items():
                if key != left_out:
                    env.setenv(key, value)
            with pytest.raises(ValidationError, match=left_out):
                build(settings)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_development_is_explicit_and_starts_on_the_defaults(
    no_vigil_environment: None, monkeypatch: pytest.MonkeyPatch, service: str
) -> None:
    """VIGIL_ENVIRONMENT=development (one variable for every service) accepts the defaults."""
    monkeypatch.setenv("VIGIL_ENVIRONMENT", "development")
    assert build(SERVICES[service][0]).environment == "development"


def test_published_development_secrets_are_refused_in_production(
    no_vigil_environment: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The secrets in the source are refused even though they are long enough."""
    monkeypatch.setenv("VIGIL_PG_DSN", DSN)
    monkeypatch.setenv("VIGIL_NOTIFY_ACK_SECRET", DEVELOPMENT_ACK_SECRET)
    with pytest.raises(ValidationError, match="VIGIL_NOTIFY_ACK_SECRET is the development value"):
        NotifySettings()
    monkeypatch.setenv("VIGIL_API_TOKEN_SECRET", DEVELOPMENT_SECRET)
    with pytest.raises(ValidationError, match="VIGIL_API_TOKEN_SECRET is the development value"):
        ApiSettings()


def test_short_shared_secrets_are_refused_in_production(
    no_vigil_environment: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIGIL_PG_DSN", DSN)
    monkeypatch.setenv("VIGIL_NOTIFY_ACK_SECRET", "short-secret")
    with pytest.raises(ValidationError, match="VIGIL_NOTIFY_ACK_SECRET is shorter than 32"):
        NotifySettings()


def test_an_unknown_environment_is_refused(
    no_vigil_environment: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo must not fall through to either mode."""
    monkeypatch.setenv("VIGIL_ENVIRONMENT", "dev")
    with pytest.raises(ValidationError):
        IngestSettings()


def test_the_service_prefix_does_not_set_the_environment(
    no_vigil_environment: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One deployment has one environment: VIGIL_NOTIFY_ENVIRONMENT (an older name) is not
    read, so setting it cannot put one service in development."""
    monkeypatch.setenv("VIGIL_NOTIFY_ENVIRONMENT", "development")
    with pytest.raises(ValidationError, match="refuses to start in production"):
        NotifySettings()


def test_rules_with_a_pinned_config_file_needs_no_database(
    no_vigil_environment: None, tmp_path: Path
) -> None:
    """A rules process on a pinned config file never opens PostgreSQL, so needs no password."""
    settings = RulesSettings(config_file=tmp_path / "config.json")
    assert settings.environment == "production"


def test_dsn_password_forms() -> None:
    assert dsn_password_problem("V", "postgresql://u:p@h/db") is None
    assert dsn_password_problem("V", "postgresql://u@h/db?password=p") is None
    assert dsn_password_problem("V", "postgresql://u@h/db") == "V names no password"
    assert dsn_password_problem("V", "postgresql://u:@h/db") == "V names no password"


def test_secret_problems() -> None:
    assert secret_problem("S", None) == "S is not set"
    assert secret_problem("S", "") == "S is not set"
    assert secret_problem("S", "abc", published={"abc"}) == (
        "S is the development value published in the source"
    )
    assert secret_problem("S", "abc", min_length=4) == "S is shorter than 4 characters"
    assert secret_problem("S", "abcd", min_length=4) is None


def test_the_local_stack_sets_development_mode(
    no_vigil_environment: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vigil stack env`, `vigil run` and the tests' stack fixture all take this environment."""
    settings = StackSettings(data_dir=tmp_path / "stack")
    ensure_secrets(settings)
    env = stack_env(settings)
    assert env["VIGIL_ENVIRONMENT"] == "development"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for settings_class, _, _ in SERVICES.values():
        assert build(settings_class).environment == "development"


def test_the_test_session_runs_in_development() -> None:
    """tests/conftest.py sets development mode for every test and service it starts."""
    assert os.environ["VIGIL_ENVIRONMENT"] == "development"
