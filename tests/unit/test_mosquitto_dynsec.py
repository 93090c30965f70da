"""The dynamic security file the stack writes: each device bound to its own id, nothing else
granted, and the admin password stored the way the plugin checks it."""

from __future__ import annotations

import base64
import hashlib

from vigil_tools.stack.mosquitto import DYNSEC_ADMIN, render_dynsec


def test_every_device_is_bound_to_its_own_id_and_to_nothing_else() -> None:
    config = render_dynsec(["thermo-P-0001", "pump-P-0001"], "secret")
    clients = {c["username"]: c for c in config["clients"]}
    assert set(clients) == {DYNSEC_ADMIN, "thermo-P-0001", "pump-P-0001"}
    for device in ("thermo-P-0001", "pump-P-0001"):
        # No password (the password file decides) and no role (acl_file decides topics).
        assert clients[device] == {"username": device, "clientid": device, "roles": []}
    # Default access "deny" is what makes the plugin defer topic decisions to acl_file.
    assert set(config["defaultACLAccess"].values()) == {False}


def test_the_admin_password_is_hashed_as_the_plugin_checks_it() -> None:
    admin = next(c for c in render_dynsec([], "secret")["clients"] if c["username"] == DYNSEC_ADMIN)
    salt = base64.b64decode(admin["salt"])
    expected = hashlib.pbkdf2_hmac("sha512", b"secret", salt, admin["iterations"])
    assert base64.b64decode(admin["password"]) == expected
    assert "clientid" not in admin
    rights = {acl["acltype"] for role in render_dynsec([], "x")["roles"] for acl in role["acls"]}
    assert rights == {"publishClientSend", "publishClientReceive", "subscribePattern"}
