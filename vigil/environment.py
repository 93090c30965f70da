"""The deployment's environment: production unless a developer's machine says otherwise.

Every service's settings derive from ``ServiceSettings``, whose ``environment`` is read from
``VIGIL_ENVIRONMENT`` alone (``production``, the default, or ``development``; never from the
service's own prefix: one deployment has one environment). In production a service refuses to
start when a secret it needs is missing, is a value published in this source tree, or is too
short to be one; its settings' validators call ``refuse_outside_development`` with what they
found, so the refusal names every problem at once.
Development mode is always explicit: the local stack's environment (``vigil stack env``), ``vigil
run`` and the test suite set ``VIGIL_ENVIRONMENT=development``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings

Environment = Literal["development", "production"]
ENVIRONMENT_VARIABLE = "VIGIL_ENVIRONMENT"
DEVELOPMENT: Environment = "development"
PRODUCTION: Environment = "production"
# Shared secrets (HMAC keys, token signing keys, bearer tokens) are at least this long.
MIN_SECRET_LENGTH = 32


class ServiceSettings(BaseSettings):
    """The base of a service's settings: its ``environment``, from ``VIGIL_ENVIRONMENT`` only."""

    environment: Environment = Field(
        default=PRODUCTION,
        validation_alias=ENVIRONMENT_VARIABLE,
        description="'production' (default) refuses missing or published secrets; "
        "'development' is for a developer's machine and the tests.",
    )

    @model_validator(mode="before")
    @classmethod
    def _environment_keyword(cls, data: Any) -> Any:
        """``Settings(environment=...)`` in code and tests. (``populate_by_name`` would do it,
        but would also read ``<prefix>ENVIRONMENT`` from the process environment.)"""
        if isinstance(data, dict) and "environment" in data:
            data = {key: value for key, value in data.items() if key != "environment"} | {
                ENVIRONMENT_VARIABLE: data["environment"]
            }
        return data


def secret_problem(
    variable: str,
    value: SecretStr | str | None,
    *,
    published: Collection[str] = (),
    min_length: int = 1,
) -> str | None:
    """What is wrong with one secret in production, or None."""
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    if not raw:
        return f"{variable} is not set"
    if raw in published:
        return f"{variable} is the development value published in the source"
    if len(raw) < min_length:
        return f"{variable} is shorter than {min_length} characters"
    return None


def dsn_password_problem(variable: str, dsn: str) -> str | None:
    """A PostgreSQL DSN without a password (in its user part or as ``?password=``), or None.

    A database that lets a service in without one trusts anyone on the network."""
    parts = urlsplit(dsn)
    if parts.password or parse_qs(parts.query).get("password"):
        return None
    return f"{variable} names no password"


def refuse_outside_development(
    environment: Environment, service: str, problems: Iterable[str | None]
) -> None:
    """Raise (a ``ValueError``, so settings validation fails) when ``environment`` is not
    development and any problem was found."""
    found = [problem for problem in problems if problem is not None]
    if environment != DEVELOPMENT and found:
        raise ValueError(
            f"{service} refuses to start in {environment}: {'; '.join(found)} "
            f"({ENVIRONMENT_VARIABLE}=development is for a developer's machine only)"
        )
