"""The API's broker-account settings (``VIGIL_API_BROKER_*``): unset, this process manages no
device account; set, the dynamic security adapter is built with them, the endpoint devices are
told defaults to the broker, and the settings refuse what would not work or would leak."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from services.api.adapters.dynsec import DynsecBrokerAccounts, device_acls, from_settings
from services.api.settings import ApiSettings

PRODUCTION: dict[str, Any] = {
    "environment": "production",
    "token_secret": "t" * 40,
    "pg": {"dsn": "postgresql://vigil_app:pw@db:5432/vigil"},
}
BROKER: dict[str, Any] = {
    "broker_admin_username": "vigil-dynsec-admin",
    "broker_admin_password_file": "/run/vigil/dynsec-admin/dynsec-admin.secret",
    "broker_host": "mosquitto",
    "broker_tls_ca_file": "/run/vigil/ca.crt",
}


def test_without_an_admin_account_no_accounts_are_managed() -> None:
    assert from_settings(ApiSettings.model_validate(PRODUCTION)) is None


def test_the_endpoint_defaults_to_the_broker_and_follows_the_device_host() -> None:
    wired = from_settings(ApiSettings.model_validate({**PRODUCTION, **BROKER}))
    assert wired is not None
    accounts, endpoint = wired
    assert isinstance(accounts, DynsecBrokerAccounts)
    assert (endpoint.host, endpoint.port, endpoint.tls) == ("mosquitto", 8883, True)
    told = ApiSettings.model_validate(
        {**PRODUCTION, **BROKER, "device_broker_host": "mqtt.example", "device_broker_port": 443}
    )
    wired = from_settings(told)
    assert wired is not None
    assert (wired[1].host, wired[1].port) == ("mqtt.example", 443)


def test_an_admin_without_its_password_file_is_refused() -> None:
    with pytest.raises(ValidationError, match="VIGIL_API_BROKER_ADMIN_PASSWORD_FILE"):
        ApiSettings.model_validate(
            {
                **PRODUCTION,
                **BROKER,
                "broker_admin_password_file": None,
                "environment": "development",
            }
        )


def test_production_refuses_the_admin_password_in_clear_text() -> None:
    plain = {**PRODUCTION, **BROKER, "broker_tls_ca_file": None}
    with pytest.raises(ValidationError, match="VIGIL_API_BROKER_TLS_CA_FILE"):
        ApiSettings.model_validate(plain)
    settings = ApiSettings.model_validate({**plain, "environment": "development"})
    assert settings.broker_tls_ca_file is None


def test_a_device_role_covers_its_own_topics_only() -> None:
    acls = {(a["acltype"], a["topic"]) for a in device_acls("thermo-1") if a["allow"]}
    assert acls == {
        ("publishClientSend", "vigil/v1/dev/thermo-1/#"),
        ("subscribeLiteral", "vigil/v1/ack/thermo-1"),
        ("unsubscribeLiteral", "vigil/v1/ack/thermo-1"),
        ("publishClientReceive", "vigil/v1/ack/thermo-1"),
    }


@pytest.mark.parametrize("device_id", ["thermo/#", "+", "vigil-ingest", ""])
def test_a_device_id_that_could_widen_a_role_is_refused(device_id: str, tmp_path: Path) -> None:
    settings = ApiSettings.model_validate(
        {
            **BROKER,
            "environment": "development",
            "broker_admin_password_file": str(tmp_path / "secret"),
        }
    )
    wired = from_settings(settings)
    assert wired is not None
    with pytest.raises(ValueError, match="invalid device id"):
        wired[0].issue(device_id)
