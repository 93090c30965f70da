"""Held alerts released after a pipeline outage: one that cannot be paged holds back no other."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from schemas.events import Alert
from services.notify.service_layer.outage import OutageConfig, OutageWatch
from tests.factories import T0, make_alert


class HeldStore:
    """The two calls ``release_due`` makes, over a list of held alerts."""

    def __init__(self, held: list[Alert]) -> None:
        self.held = held
        self.released: dict[str, str] = {}

    async def due_held(self, now: datetime) -> list[tuple[Alert, bool]]:
        return [(a, False) for a in self.held if a.dedup_key not in self.released]

    async def mark_released(self, dedup_key: str, now: datetime, how: str) -> None:
        self.released[dedup_key] = how


async def _no_policy(care_team_id: str) -> None:
    return None


def _watch(store: HeldStore) -> OutageWatch:
    return OutageWatch(
        store=cast(Any, store),
        load_policy=_no_policy,
        config=OutageConfig(sender_address="vigil@h.test", fallback_email="fallback@h.test"),
        clock=lambda: T0,
    )


async def test_an_alert_that_cannot_be_paged_stays_held_and_the_next_is_paged() -> None:
    broken, fine = make_alert(patient_id="P-broken"), make_alert(patient_id="P-fine")
    store = HeldStore([broken, fine])
    paged: list[str] = []

    async def page(alert: Alert, now: datetime) -> None:
        if alert.patient_id == "P-broken":
            raise ValueError("its team's policy cannot be read")
        paged.append(alert.patient_id)

    assert await _watch(store).release_due(page) == 1
    assert paged == ["P-fine"]
    assert store.released == {fine.dedup_key: "paged"}
    # Still held: tried again on the next round, and released once it can be paged.
    assert [a.patient_id for a, _ in await store.due_held(T0)] == ["P-broken"]
    assert await _watch(store).release_due(lambda a, n: _noted(paged, a)) == 1
    assert paged == ["P-fine", "P-broken"]


async def _noted(paged: list[str], alert: Alert) -> None:
    paged.append(alert.patient_id)
