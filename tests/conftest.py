"""Shared fixtures. Tests that need the real stack (Mosquitto, Kafka, PostgreSQL) ask for
``stack_env``; the first such test starts the test stack (its own folder and ports, beside any
development stack) and later runs reuse it. ``.ci/run`` stops it at the end."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# The tests run every service in development mode, explicitly (vigil.environment): production,
# the default, refuses the development secrets the tests use. Tests of that refusal pass
# environment="production" themselves.
os.environ["VIGIL_ENVIRONMENT"] = "development"

# The same values as TEST_STACK in the Makefile, so a bare `pytest` uses the test stack too.
TEST_STACK_DEFAULTS = {
    "VIGIL_STACK_DATA_DIR": ".vigil-test",
    "VIGIL_STACK_MQTT_PORT": "21883",
    "VIGIL_STACK_KAFKA_PORT": "29092",
    "VIGIL_STACK_KAFKA_CONTROLLER_PORT": "29093",
    "VIGIL_STACK_PG_PORT": "25432",
    "VIGIL_STACK_SMTP_PORT": "20025",
}


@pytest.fixture(scope="session")
def stack_env() -> Iterator[dict[str, str]]:
    """Start (or reuse) the test stack and expose its connection variables to the process."""
    from vigil_tools.stack import StackSettings, up
    from vigil_tools.stack import stack_env as read_env

    for key, value in TEST_STACK_DEFAULTS.items():
        os.environ.setdefault(key, value)
    settings = StackSettings()
    up(settings)
    env = read_env(settings)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def pg_dsn(stack_env: dict[str, str]) -> str:
    return stack_env["VIGIL_PG_DSN"]
