"""Ingest's admission in one process, no stack: CPU µs per reading of ``admit`` (validation,
binding to a patient, Telemetry, the duplicate window) over batches of readings written as
bench/ingest.py's load generator writes them (100 devices, 500 readings a batch).

    PYTHONPATH=<tree> python bench/ingest_admit.py [--readings 100000] [--repeats 5]

Prints one JSON line: the CPU time (``time.process_time``) per reading of each repeat and their
minimum, the least disturbed by other processes on the machine. Each repeat starts with an empty
duplicate window and admits every reading once (no duplicates).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.ingest.domain.admission import admit
from services.ingest.domain.dedup import RecentMessages
from services.ingest.domain.registry import Binding, BindingIndex
from services.ingest.domain.validation import ValidationLimits

BATCH = 500
DEVICES = 100


def readings(count: int, now: datetime) -> list[tuple[str, bytes]]:
    devices = [f"bench-t-{i:03d}" for i in range(DEVICES)]
    made = []
    for i in range(count):
        device = devices[i % DEVICES]
        at = (now - timedelta(seconds=1, microseconds=i)).isoformat(timespec="microseconds")
        payload = (
            f'{{"schema":"vigil.device.temperature.v1","message_id":"{uuid.UUID(int=i)}",'
            f'"device_id":"{device}","seq":{i},"device_time":"{at}",'
            '"value":37.2,"unit":"C","site":"axillary"}'
        )
        made.append((f"vigil/v1/dev/{device}/temperature", payload.encode()))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    now = datetime.now(UTC)
    registry = BindingIndex(
        [
            Binding(f"bench-t-{i:03d}", f"P-{i:04d}", now - timedelta(days=1), None)
            for i in range(DEVICES)
        ]
    )
    messages = readings(args.readings, now)
    batches = [messages[i : i + BATCH] for i in range(0, len(messages), BATCH)]
    limits = ValidationLimits()
    per_reading = []
    for _ in range(args.repeats):
        window = RecentMessages(len(messages))
        started = time.process_time()
        for batch in batches:
            admitted = admit(batch, now, registry, window, limits)
            if len(admitted.accepted) != len(batch):
                raise SystemExit(f"not all admitted: {admitted.rejected[:1]}")
        per_reading.append((time.process_time() - started) / len(messages) * 1e6)
    print(
        json.dumps(
            {
                "bench": "ingest_admit",
                "readings": len(messages),
                "admit_cpu_us_per_reading": [round(us, 2) for us in per_reading],
                "min_us": round(min(per_reading), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
