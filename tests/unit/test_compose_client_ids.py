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
