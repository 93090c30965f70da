"""The compose deployment binds device client ids like the local stack: its Mosquitto loads the
dynamic security plugin with a file on the accounts volume, which the accounts one-shot creates
once and never overwrites (the operator's bindings live in it)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_broker_loads_the_plugin_with_its_file_on_the_accounts_volume() -> None:
    conf = (ROOT / "deploy" / "compose" / "mosquitto.conf").read_text()
    assert re.search(r"^plugin /usr/lib/mosquitto_dynamic_security\.so$", conf, re.MULTILINE)
    found = re.search(r"^plugin_opt_config_file (/mosquitto/accounts)/(\S+)$", conf, re.MULTILINE)
    assert found, "the plugin's file must be where the broker may write it"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert f"mosquitto-accounts:{found.group(1)}" in compose["services"]["mosquitto"]["volumes"]
    oneshot = compose["services"]["mosquitto-accounts"]["command"][0]
    path = f"{found.group(1)}/{found.group(2)}"
    # Created only when missing: a restart of the deployment keeps every device's binding.
    assert f"if [ ! -f {path} ]; then" in oneshot
    assert f"mosquitto_ctrl dynsec init {path} vigil-dynsec-admin" in oneshot
    assert f"chmod 0600 {path}" in oneshot


def test_the_api_creates_device_accounts_through_the_plugin_as_its_admin() -> None:
    """The API is given the plugin's admin (the one-shot's), a copy of its password readable by
    the Vigil image's user on a volume of its own, the broker over TLS with the CA the other
    services trust, and the host name devices are told; its production checks pass."""
    from services.api.adapters.dynsec import from_settings
    from services.api.settings import ApiSettings

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    api = compose["services"]["api"]
    env = {str(k): str(v) for k, v in api["environment"].items()}
    oneshot = compose["services"]["mosquitto-accounts"]
    script = oneshot["command"][0]
    admin = re.search(r"mosquitto_ctrl dynsec init \S+ (\S+)", script)
    assert admin and env["VIGIL_API_BROKER_ADMIN_USERNAME"] == admin.group(1)
    secret = Path(env["VIGIL_API_BROKER_ADMIN_PASSWORD_FILE"])
    mounted = {m.split(":")[1]: m.split(":")[0] for m in api["volumes"]}
    volume = mounted[str(secret.parent)]
    assert f"{volume}:{secret.parent}:ro" in api["volumes"]
    copy_dir = next(m.split(":")[1] for m in oneshot["volumes"] if m.startswith(f"{volume}:"))
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    uid = re.search(r"--uid (\d+)", dockerfile)
    assert uid, "the image's user has a fixed uid"
    assert f"cp /mosquitto/accounts/dynsec-admin.secret {copy_dir}/{secret.name}" in script
    assert f"chown {uid.group(1)} {copy_dir}/{secret.name}" in script
    assert f"chmod 0400 {copy_dir}/{secret.name}" in script
    # Only the secret's volume: the broker's password file and plugin file stay the broker's.
    assert not any(m.startswith("mosquitto-accounts:") for m in api["volumes"])
    assert (env["VIGIL_API_BROKER_HOST"], env["VIGIL_API_BROKER_PORT"]) == ("mosquitto", "8883")
    assert f"./deploy/compose/tls/ca.crt:{env['VIGIL_API_BROKER_TLS_CA_FILE']}:ro" in api["volumes"]
    assert (
        env["VIGIL_API_DEVICE_BROKER_HOST"]
        == "${VIGIL_MQTT_DEVICE_HOST:?set VIGIL_MQTT_DEVICE_HOST}"
    )
    names = {k: v for k, v in env.items() if k.startswith("VIGIL_API_BROKER_")}
    settings = ApiSettings.model_validate(
        {
            "environment": "production",
            "token_secret": "t" * 40,
            "pg": {"dsn": "postgresql://vigil_app:pw@timescaledb:5432/vigil"},
            "broker_admin_username": names["VIGIL_API_BROKER_ADMIN_USERNAME"],
            "broker_admin_password_file": names["VIGIL_API_BROKER_ADMIN_PASSWORD_FILE"],
            "broker_host": names["VIGIL_API_BROKER_HOST"],
            "broker_port": names["VIGIL_API_BROKER_PORT"],
            "broker_tls_ca_file": names["VIGIL_API_BROKER_TLS_CA_FILE"],
            "device_broker_host": "mqtt.hospital.example",
        }
    )
    wired = from_settings(settings)
    assert wired is not None
    assert (wired[1].host, wired[1].port, wired[1].tls) == ("mqtt.hospital.example", 8883, True)
