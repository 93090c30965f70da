"""BindingIndex: which patient a device served at a given device time.

Pumps are swapped at bag change and thermometers are reissued, so a device's patient is a
function of time; a reading belongs to the patient the device was bound to when it was measured,
not when it arrived.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Binding:
    device_id: str
    patient_id: str
    valid_from: datetime
    valid_to: datetime | None


class BindingIndex:
    def __init__(self, bindings: Iterable[Binding]) -> None:
        per_device: dict[str, list[Binding]] = {}
        for binding in bindings:
            per_device.setdefault(binding.device_id, []).append(binding)
        self._bindings = {d: sorted(b, key=lambda x: x.valid_from) for d, b in per_device.items()}
        self._starts = {d: [b.valid_from for b in bs] for d, bs in self._bindings.items()}

    def knows(self, device_id: str) -> bool:
        return device_id in self._bindings

    def patient_at(self, device_id: str, at: datetime) -> str | None:
        bindings = self._bindings.get(device_id)
        if not bindings:
            return None
        index = bisect.bisect_right(self._starts[device_id], at) - 1
        if index < 0:
            return None
        binding = bindings[index]
        if binding.valid_to is not None and at >= binding.valid_to:
            return None
        return binding.patient_id

    def __len__(self) -> int:
        return len(self._bindings)
