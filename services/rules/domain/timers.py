"""TimerWheel: the rules' timers, each due on its own clock, fired in one order.

The rules time two kinds of deadline (docs/rules.md, "Time"):

- ``ARRIVAL`` timers (the absence rules: device silent, data lost, fever unobserved) are due
  when the arrival clock passes their deadline;
- ``CLINICAL`` timers (the pump clocks: bag change due, the interruption clock) are due when
  the later of the arrival clock and the event-time watermark passes it.

``schedule`` files a ``Timer`` (deadline, kind, patient, device) on its lane; ``due`` says
whether anything is due at the given clocks without taking it; ``pop`` takes the next due timer,
earliest first and, for equal deadlines, in (kind, patient, device) order across both lanes, so a
consumer that calls it until it answers None also takes the timers it scheduled meanwhile if they
are due too. ``cancel`` takes a timer back: it is dropped when it would have come due (no search
when cancelling). ``arrival_next`` and ``clinical_next`` are each lane's earliest deadline
(``inf`` when empty), so the engine's per-record check that nothing is due is two comparisons
and no call.

Entries are also lazy for their owner: each names the deadline it was armed with, and the
owner's state says which deadline is armed now, so an entry whose deadline the state no longer
holds is stale and decides nothing (a restored engine re-files what its state holds). A heap per
lane: schedule and take in O(log n), and a clock move that makes nothing due costs two
comparisons. Pure: no clock of its own.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import NamedTuple

ARRIVAL = 0
CLINICAL = 1
_INF = float("inf")
# A ``Timer`` built from its fields in C: the NamedTuple's own constructor is a Python function,
# and the engine files a timer for most records.
_new = tuple.__new__


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

    def schedule(
        self, lane: int, deadline: float, kind: str, patient_id: str, device_id: str
    ) -> None:
        """File the timer (``deadline``, ``kind``, ``patient_id``, ``device_id``) on ``lane``
        (``ARRIVAL`` or ``CLINICAL``). A timer cancelled and not yet come due is simply no
        longer cancelled: it is filed once."""
        timer: Timer = _new(Timer, (deadline, kind, patient_id, device_id))
        cancelled = self._cancelled
        if cancelled and timer in cancelled:
            cancelled.discard(timer)
            return
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

    def pop(self, heard: float, now: float) -> Timer | None:
        """Take the next timer due at arrival clock ``heard`` (the arrival lane) and ``now``,
        the later of the arrival clock and the watermark (the clinical lane), in firing order
        (module docstring); None when nothing is due."""
        arrival = self._arrival
        clinical = self._clinical
        pop = heapq.heappop
        while True:
            if arrival and arrival[0][0] <= heard:
                if clinical and clinical[0][0] <= now and clinical[0] < arrival[0]:
                    timer = pop(clinical)
                    self.clinical_next = clinical[0][0] if clinical else _INF
                else:
                    timer = pop(arrival)
                    self.arrival_next = arrival[0][0] if arrival else _INF
            elif clinical and clinical[0][0] <= now:
                timer = pop(clinical)
                self.clinical_next = clinical[0][0] if clinical else _INF
            else:
                return None
            cancelled = self._cancelled
            if cancelled and timer in cancelled:
                cancelled.discard(timer)
                continue
            return timer
