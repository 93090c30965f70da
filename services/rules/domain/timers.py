"""TimerWheel: the rules' timers, each due on its own clock, fired in one order.

The rules time two kinds of deadline (docs/rules.md, "Time"):

- ``ARRIVAL`` timers (the absence rules: device silent, data lost, fever unobserved) are due
  when the arrival clock passes their deadline;
- ``CLINICAL`` timers (the pump clocks: bag change due, the interruption clock) are due when
  the later of the arrival clock and the event-time watermark passes it.

``schedule`` files a ``Timer`` (deadline, kind, patient, device) on its lane; ``due`` says
whether anything is due at the given clocks without taking it; ``advance`` yields every due
timer, earliest first and, for equal deadlines, in (kind, patient, device) order across both
lanes, including timers scheduled while it runs if they are due too. ``cancel`` takes a timer
back: it is dropped when it would have come due (no search when cancelling). ``arrival_next``
and ``clinical_next`` are each lane's earliest deadline (``inf`` when empty), so the engine's
per-record check that nothing is due is two comparisons and no call.

Entries are also lazy for their owner: each names the deadline it was armed with, and the
owner's state says which deadline is armed now, so an entry whose deadline the state no longer
holds is stale and decides nothing (a restored engine re-files what its state holds). A heap per
lane: schedule and take in O(log n), and a clock move that makes nothing due costs two
comparisons. Pure: no clock of its own.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from typing import NamedTuple

ARRIVAL = 0
CLINICAL = 1
_INF = float("inf")


class Timer(NamedTuple):
    """One armed deadline; its fields in the order timers due together fire in."""

    deadline: float
    kind: str
    patient_id: str
    device_id: str


class TimerWheel:
    """The timers of one engine: an arrival lane and a clinical lane (module docstring)."""

    __slots__ = ("_arrival", "_cancelled", "_clinical", "arrival_next", "clinical_next")

    def __init__(self) -> None:
        self._arrival: list[Timer] = []
        self._clinical: list[Timer] = []
        self._cancelled: set[Timer] = set()
        self.arrival_next = _INF
        self.clinical_next = _INF

    def schedule(self, lane: int, timer: Timer) -> None:
        """File ``timer`` on ``lane`` (``ARRIVAL`` or ``CLINICAL``). A timer cancelled and
        not yet come due is simply no longer cancelled: it is filed once."""
        cancelled = self._cancelled
        if cancelled and timer in cancelled:
            cancelled.discard(timer)
            return
        deadline = timer[0]
        if lane == ARRIVAL:
            heapq.heappush(self._arrival, timer)
            if deadline < self.arrival_next:
                self.arrival_next = deadline
        else:
            heapq.heappush(self._clinical, timer)
            if deadline < self.clinical_next:
                self.clinical_next = deadline

    def extend(self, lane: int, timers: Iterable[Timer]) -> None:
        """File many timers on ``lane`` at once (a restore)."""
        heap = self._arrival if lane == ARRIVAL else self._clinical
        heap.extend(timers)
        heapq.heapify(heap)
        self._earliest()

    def cancel(self, timer: Timer) -> None:
        """Take back a scheduled ``timer``: it is dropped when it comes due."""
        self._cancelled.add(timer)

    def clear(self) -> None:
        self._arrival.clear()
        self._clinical.clear()
        self._cancelled.clear()
        self._earliest()

    def _earliest(self) -> None:
        self.arrival_next = self._arrival[0].deadline if self._arrival else _INF
        self.clinical_next = self._clinical[0].deadline if self._clinical else _INF

    def __len__(self) -> int:
        """Timers filed and not yet taken (cancelled ones included until they come due)."""
        return len(self._arrival) + len(self._clinical)

    def due(self, heard: float, watermark: float) -> bool:
        """Whether a timer is due at arrival clock ``heard`` and event-time ``watermark``."""
        return self.arrival_next <= heard or self.clinical_next <= (
            heard if heard > watermark else watermark
        )

    def advance(self, heard: float, watermark: float) -> Iterator[Timer]:
        """Take and yield every timer due at these clocks, in firing order (module
        docstring); a timer scheduled by the consumer meanwhile is yielded too if due."""
        arrival = self._arrival
        clinical = self._clinical
        cancelled = self._cancelled
        now = heard if heard > watermark else watermark
        pop = heapq.heappop
        while True:
            take_arrival = bool(arrival) and arrival[0].deadline <= heard
            take_clinical = bool(clinical) and clinical[0].deadline <= now
            if take_arrival and take_clinical:
                take_clinical = clinical[0] < arrival[0]
                take_arrival = not take_clinical
            if take_arrival:
                timer = pop(arrival)
                self.arrival_next = arrival[0].deadline if arrival else _INF
            elif take_clinical:
                timer = pop(clinical)
                self.clinical_next = clinical[0].deadline if clinical else _INF
            else:
                return
            if cancelled and timer in cancelled:
                cancelled.discard(timer)
                continue
            yield timer
