"""NotifySettings: its own prefix, the shared Kafka/PostgreSQL prefixes, refused combinations."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from services.notify.settings import NotifySettings
from vigil.settings import PostgresSettings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stack fixtures and the e2e test export VIGIL_* into this process; start from none of them.
    for key in list(os.environ):
        if key.startswith(("VIGIL_NOTIFY_", "VIGIL_KAFKA_", "VIGIL_PG_")):
            monkeypatch.delenv(key)


def test_defaults_match_the_local_stack() -> None:
    """Without environment the service points at the local stack's SMTP sink and fallback."""
    settings = NotifySettings()
    assert (settings.smtp_host, settings.smtp_port) == ("127.0.0.1", 10025)
    assert settings.fallback_email == "vigil-oncall-fallback@localhost"
    assert settings.max_tries_per_channel == 3
    assert settings.group_id == "vigil-notify"


def test_reads_its_prefix_and_the_shared_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """VIGIL_NOTIFY_* sets notify fields; VIGIL_KAFKA_* and VIGIL_PG_* reach the composed blocks."""
    monkeypatch.setenv("VIGIL_NOTIFY_SMTP_PORT", "2525")
    monkeypatch.setenv("VIGIL_NOTIFY_FALLBACK_EMAIL", "night-desk@hospital.example")
    monkeypatch.setenv("VIGIL_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:29092")
    monkeypatch.setenv("VIGIL_PG_DSN", "postgresql://vigil@127.0.0.1:25432/vigil")
    settings = NotifySettings()
    assert settings.smtp_port == 2525
    assert settings.fallback_email == "night-desk@hospital.example"
    assert settings.kafka.bootstrap_servers == "127.0.0.1:29092"
    assert settings.pg.dsn == "postgresql://vigil@127.0.0.1:25432/vigil"


def test_password_stays_out_of_the_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    """A logged settings object does not show the SMTP password."""
    monkeypatch.setenv("VIGIL_NOTIFY_SMTP_USERNAME", "vigil")
    monkeypatch.setenv("VIGIL_NOTIFY_SMTP_PASSWORD", "s3cret-relay-pass")
    settings = NotifySettings()
    assert settings.smtp_password is not None
    assert settings.smtp_password.get_secret_value() == "s3cret-relay-pass"
    assert "s3cret-relay-pass" not in repr(settings)


@pytest.mark.parametrize(
    "env",
    [
        {"VIGIL_NOTIFY_SMTP_USERNAME": "vigil"},
        {"VIGIL_NOTIFY_RETRY_BASE_S": "30", "VIGIL_NOTIFY_RETRY_CAP_S": "10"},
        {"VIGIL_NOTIFY_MAX_TRIES_PER_CHANNEL": "0"},
    ],
)
def test_refuses_inconsistent_settings(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    """A login without a password, a cap below the base delay, or zero tries fail at start-up."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        NotifySettings()


def test_built_in_ack_secret_is_refused_outside_development() -> None:
    """Outside development the published acknowledgement secret (or a short one) is refused."""
    NotifySettings(environment="development")  # allowed on a developer's machine
    with pytest.raises(ValidationError, match="ACK_SECRET"):
        NotifySettings(environment="production")
    with pytest.raises(ValidationError, match="ACK_SECRET"):
        NotifySettings(environment="production", ack_secret="short")
    NotifySettings(
        environment="production",
        ack_secret="s" * 40,
        pg=PostgresSettings(dsn="postgresql://vigil_app:pw@db:5432/vigil"),
    )
