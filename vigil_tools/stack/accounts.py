"""The local stack's Mosquitto as ingest's ``BrokerAccounts``: its password file and ACL under
the stack's data directory (``vigil_tools.stack.mosquitto``)."""

from __future__ import annotations

from vigil_tools.stack.mosquitto import (
    add_device_credential,
    revoke_device_credential,
    rotate_device_credential,
)
from vigil_tools.stack.settings import StackSettings


class LocalStackBroker:
    """Issues, rotates and revokes device accounts on the local stack's broker."""

    def __init__(self, settings: StackSettings | None = None) -> None:
        self._settings = settings or StackSettings()

    def issue(self, device_id: str) -> str:
        return add_device_credential(self._settings, device_id)

    def rotate(self, device_id: str) -> str:
        return rotate_device_credential(self._settings, device_id)

    def revoke(self, device_id: str) -> None:
        revoke_device_credential(self._settings, device_id)
