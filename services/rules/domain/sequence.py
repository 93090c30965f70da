"""The data-lost rule: a gap in a device's ``seq`` that stays open is a technical alarm.

A device numbers its messages one by one (docs/mqtt.md, section 4). When a message arrives whose
``seq`` skips numbers, the skipped messages were lost on the way or are still in a hub's buffer.
The gap is noted with the ingest time it was seen at; every message that arrives later with a
number inside it fills it. If any of it is still missing ``data_lost_wait`` after it was seen
(on the arrival clock, like the other absence rules), the rules raise one technical
``data_lost`` alert for the device and patient, naming the range and how many are missing: a
reading or an alarm may have been in them, and nobody saw it.

A jump of more than ``COUNTER_RESTART_JUMP`` numbers is a device that started its counter
afresh (docs/mqtt.md allows starting from the clock in milliseconds after a reboot that lost
it): counted, not alerted. Pure: no I/O, no clock.
"""

from __future__ import annotations

from schemas.events import Alert, AlertKind, AlertPhase, AlertPriority
from services.rules.domain.alerting import at, build_alert, evidence
from services.rules.domain.state import DeviceTrack, Gap

DATA_LOST_RULE_ID = "data_lost"
DATA_LOST_CODE = "data_lost"
# More numbers skipped than this is a counter that restarted, not a loss (at one message a
# minute, ten thousand messages are a week: a silence that long is paged as device silent).
COUNTER_RESTART_JUMP = 10_000


def step(device: DeviceTrack, seq: int, ingest_t: float) -> Gap | None:
    """The rule's step for a message of ``device`` numbered ``seq`` that arrived at
    ``ingest_t``: the gap it shows (numbers skipped, to be timed), else None; a number inside
    an open gap fills it."""
    hi = device.seq_hi
    if hi is None or seq > hi:
        device.seq_hi = seq
        if hi is not None and seq > hi + 1:
            return Gap(hi + 1, seq - 1, ingest_t)
    elif device.gaps:
        fill(device.gaps, seq)
        if not device.gaps:
            device.gaps = None
    return None


def fill(gaps: list[Gap], seq: int) -> bool:
    """Take ``seq`` out of the open gaps it falls in; whether it was in one."""
    for index, gap in enumerate(gaps):
        low, high, seen = gap.low, gap.high, gap.seen
        if low <= seq <= high:
            parts = [Gap(low, seq - 1, seen)] if low < seq else []
            if seq < high:
                parts.append(Gap(seq + 1, high, seen))
            gaps[index : index + 1] = parts
            return True
    return False


def missing_count(gaps: list[Gap]) -> int:
    return sum(g.high - g.low + 1 for g in gaps)


def _order(gap: Gap) -> tuple[int, int, float]:
    return (gap.low, gap.high, gap.seen)


def data_lost_alert(
    *,
    patient_id: str,
    device_id: str,
    is_thermometer: bool,
    gaps: list[Gap],
    deadline: float,
    rule_version: str,
    config_version: str,
) -> Alert:
    """The alert for ``gaps`` (seen at the same time) still open at ``deadline``."""
    low = min(g.low for g in gaps)
    high = max(g.high for g in gaps)
    seen = min(g.seen for g in gaps)
    count = missing_count(gaps)
    what = "thermometer" if is_thermometer else "infusion pump"
    ranges = ", ".join(
        f"{g.low}" if g.low == g.high else f"{g.low}-{g.high}" for g in sorted(gaps, key=_order)
    )
    plural = "message" if count == 1 else "messages"
    return build_alert(
        dedup_key=f"{patient_id}:{DATA_LOST_RULE_ID}:{device_id}:{low}-{high}",
        phase=AlertPhase.START,
        patient_id=patient_id,
        device_id=device_id,
        kind=AlertKind.TECHNICAL,
        code=DATA_LOST_CODE,
        priority=AlertPriority.MEDIUM,
        title=(
            f"Data lost: {count} {plural} from the {what} never arrived (seq {ranges}); "
            "a reading or an alarm in them was not seen"
        ),
        device_time=at(deadline),
        ingest_time=at(seen),
        evidence=(evidence("missing_messages", float(count), 0.0, ">", at(seen), unit="1"),),
        rule_id=DATA_LOST_RULE_ID,
        rule_version=rule_version,
        config_version=config_version,
    )
