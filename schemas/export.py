"""JSON Schema files generated from the message models, for device makers and other consumers.

``python -m schemas.export`` writes one file per contract into ``schemas/json/``;
``python -m schemas.export --check`` writes nothing and exits 1, naming each stale file, when the
committed files differ from what the models generate. Output is deterministic (sorted keys,
two-space indent, trailing newline), so a model change shows as a reviewable diff.

The models in ``schemas.device`` and ``schemas.events`` are the source of truth; this module
only renders them and must not change them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel

from schemas.ack import IngestAck
from schemas.device import HeartbeatMessage, PumpEvent, PumpStatus, TemperatureReading
from schemas.events import Alert, DeadLetter, DeliveryAttempt, Page, Telemetry

SCHEMA_DIR = Path(__file__).resolve().parent / "json"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_SUFFIX = ".schema.json"


@dataclass(frozen=True, slots=True)
class Contract:
    """One message contract and the file its JSON Schema goes to."""

    filename: str
    model: type[BaseModel]
    description: str

    @property
    def schema_name(self) -> str:
        """The value of the contract's ``schema`` field, e.g. ``vigil.device.temperature.v1``."""
        (name,) = get_args(self.model.model_fields["schema_"].annotation)
        return str(name)


CONTRACTS: tuple[Contract, ...] = (
    Contract(
        "temperature.v1.schema.json",
        TemperatureReading,
        "A body-temperature reading a home thermometer publishes on "
        "vigil/v1/dev/{device_id}/temperature (MQTT, QoS 1).",
    ),
    Contract(
        "pump-status.v1.schema.json",
        PumpStatus,
        "An infusion pump's periodic status, published on "
        "vigil/v1/dev/{device_id}/pump-status (MQTT, QoS 1).",
    ),
    Contract(
        "pump-event.v1.schema.json",
        PumpEvent,
        "An infusion pump's alarm or state change, published on "
        "vigil/v1/dev/{device_id}/pump-event (MQTT, QoS 1).",
    ),
    Contract(
        "heartbeat.v1.schema.json",
        HeartbeatMessage,
        "The pipeline heartbeat a service device publishes on "
        "vigil/v1/dev/{device_id}/heartbeat (MQTT, QoS 1).",
    ),
    Contract(
        "ingest-ack.v1.schema.json",
        IngestAck,
        "Ingest's end-to-end acknowledgement of a device's messages, published on "
        "vigil/v1/ack/{device_id} (MQTT, QoS 1); only that device (or its hub) may read it.",
    ),
    Contract(
        "telemetry.v1.schema.json",
        Telemetry,
        "A device message that ingest accepted and bound to a patient (Kafka, internal).",
    ),
    Contract(
        "alert.v1.schema.json",
        Alert,
        "One phase of an alert that a rule decided (Kafka, internal).",
    ),
    Contract(
        "deadletter.v1.schema.json",
        DeadLetter,
        "An input that could not be accepted, with its reason code (Kafka, internal).",
    ),
    Contract(
        "page.v1.schema.json",
        Page,
        "The decision to notify a person about an alert over one channel (Kafka, internal).",
    ),
    Contract(
        "delivery.v1.schema.json",
        DeliveryAttempt,
        "One attempt at delivering a page, with its outcome (Kafka, internal).",
    ),
)


def schema_document(contract: Contract) -> dict[str, Any]:
    """The JSON Schema of one contract, field names as on the wire (``schema``, not ``schema_``)."""
    document = contract.model.model_json_schema(by_alias=True, mode="validation")
    # The model's docstring says what the message is; the contract adds where it travels.
    model_doc = document.get("description", "")
    document["description"] = f"{contract.description}\n\n{model_doc}".strip()
    document["title"] = f"{contract.model.__name__} ({contract.schema_name})"
    document["$id"] = f"urn:vigil:schema:{contract.schema_name}"
    document["$schema"] = JSON_SCHEMA_DIALECT
    return document


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generate() -> dict[str, str]:
    """Every schema file's name and content, as the models define them now."""
    return {contract.filename: render(schema_document(contract)) for contract in CONTRACTS}


def stale_files(directory: Path, expected: dict[str, str] | None = None) -> list[str]:
    """Files in ``directory`` that are missing, differ from the models, or match no model.

    Each entry is ``"<file>: <why>"``; an empty list means the directory is up to date.
    """
    expected = generate() if expected is None else expected
    problems: list[str] = []
    for filename, content in sorted(expected.items()):
        path = directory / filename
        if not path.exists():
            problems.append(f"{filename}: missing")
        elif path.read_text(encoding="utf-8") != content:
            problems.append(f"{filename}: differs from the models")
    for path in sorted(directory.glob(f"*{SCHEMA_SUFFIX}")):
        if path.name not in expected:
            problems.append(f"{path.name}: generated by no model")
    return problems


def write(directory: Path) -> list[Path]:
    """Write every schema file into ``directory``; returns the files that changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed: list[Path] = []
    for filename, content in generate().items():
        path = directory / filename
        if not path.exists() or path.read_text(encoding="utf-8") != content:
            path.write_text(content, encoding="utf-8")
            changed.append(path)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m schemas.export",
        description="Generate JSON Schema files from the message models.",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if any file is stale"
    )
    parser.add_argument("--dir", type=Path, default=SCHEMA_DIR, help="output directory")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale_files(args.dir)
        for problem in problems:
            print(f"stale: {problem}", file=sys.stderr)
        if problems:
            print("run: python -m schemas.export", file=sys.stderr)
            return 1
        return 0
    for path in write(args.dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
