"""Deterministic alert identities, so a replay or a redelivery reproduces the same alert id."""

from __future__ import annotations

import uuid

_ALERT_NAMESPACE = uuid.UUID("5b0f6a52-8f1e-4b8a-9d0a-3c6f7e1d2a90")


def alert_id_for(dedup_key: str, phase: str) -> uuid.UUID:
    return uuid.uuid5(_ALERT_NAMESPACE, f"{dedup_key}|{phase}")
