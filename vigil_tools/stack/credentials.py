"""The stack's generated passwords: created once in ``data_dir/secrets.json`` (0600), then reused.

Nothing here is a production secret, but the local stack still refuses anonymous and passwordless
access so that services exercise the same authentication paths as in a real deployment.
"""

from __future__ import annotations

import json
import secrets
from typing import Final

from pydantic import BaseModel, ConfigDict, Field

from vigil_tools.stack.process import StackError, write_file
from vigil_tools.stack.settings import StackSettings

INGEST_MQTT_USER: Final = "vigil-ingest"
SIM_MQTT_USER: Final = "vigil-sim"
PG_APP_ROLE: Final = "vigil"
PG_APP_DATABASE: Final = "vigil"
PG_SUPERUSER: Final = "postgres"


def new_password() -> str:
    # URL-safe so it can sit in a DSN, an env file and a Mosquitto password file unescaped.
    return secrets.token_urlsafe(24)


class StackSecrets(BaseModel):
    """Content of ``secrets.json``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    mqtt_ingest_password: str = Field(default_factory=new_password)
    mqtt_sim_password: str = Field(default_factory=new_password)
    pg_vigil_password: str = Field(default_factory=new_password)
    pg_superuser_password: str = Field(default_factory=new_password)


def load_secrets(settings: StackSettings) -> StackSecrets:
    """The secrets of this stack; an error when ``up`` has never created them."""
    try:
        raw = settings.secrets_file.read_text()
    except FileNotFoundError as exc:
        raise StackError(
            f"{settings.secrets_file} does not exist; run `python -m vigil_tools.stack up` first"
        ) from exc
    return StackSecrets.model_validate(json.loads(raw))


def ensure_secrets(settings: StackSettings) -> StackSecrets:
    """Load the secrets, generating and saving them on first use."""
    if settings.secrets_file.exists():
        return load_secrets(settings)
    generated = StackSecrets()
    write_file(settings.secrets_file, generated.model_dump_json(indent=2) + "\n", mode=0o600)
    return generated
