"""The AsyncAPI 3.0 document of Vigil's MQTT and Kafka interfaces, generated from the code.

``python -m schemas.asyncapi`` writes ``schemas/asyncapi.json``; ``--check`` writes nothing and
exits 1 when the committed file differs from what the code generates. The MQTT channels are the
channels of ``schemas.topics``; the Kafka channels are the topics of ``schemas.kafka_topics``;
every message's payload is a ``$ref`` to the JSON Schema file ``schemas.export`` writes for its
contract, so the document never restates a field.

What the code does not say elsewhere, and this module declares, is the part of the Kafka contract
that lives in the services' producer calls: each topic's key, who writes and who reads it
(``KAFKA_CHANNELS``). The unit test fails when a topic of ``schemas.kafka_topics`` or a contract
of ``schemas.export`` is neither described here nor listed with a reason as carried by no topic.
Output is deterministic (sorted keys, two-space indent, trailing newline).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from schemas import kafka_topics
from schemas.ack import ACK_PREFIX, ACK_SCHEMA
from schemas.export import CONTRACTS, SCHEMA_DIR, Contract, render
from schemas.topics import CHANNEL_SCHEMAS, MQTT_PREFIX

DOCUMENT_FILE: Final = Path(__file__).resolve().parent / "asyncapi.json"
ASYNCAPI_VERSION: Final = "3.0.0"
# The JSON Schema files declare draft 2020-12 (schemas.export.JSON_SCHEMA_DIALECT).
SCHEMA_FORMAT: Final = "application/schema+json;version=draft-2020-12"
MQTT_BINDING_VERSION: Final = "0.2.0"
KAFKA_BINDING_VERSION: Final = "0.5.0"

# Defaults of the local development stack (vigil_tools.stack.StackSettings; a unit test keeps them
# equal). A deployment's hosts and ports are given by its operator.
LOCAL_HOST: Final = "127.0.0.1"
LOCAL_MQTT_PORT: Final = 11883
LOCAL_MQTT_TLS_PORT: Final = 11884
LOCAL_KAFKA_PORT: Final = 19092

_DEVICE_ID_DESCRIPTION: Final = (
    "The publishing device's id, which is also its MQTT username: 1 to 64 characters of "
    "A-Z a-z 0-9 _ . - starting with a letter or digit (^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$), "
    "not starting with 'vigil-'. The broker's ACL lets an account write only under its own id."
)


@dataclass(frozen=True, slots=True)
class InternalMessage:
    """A Kafka record with no public contract (a service's own state); described, not schemed."""

    name: str
    summary: str
    key: str


@dataclass(frozen=True, slots=True)
class KafkaChannel:
    """One Kafka topic: what it carries, how it is keyed, who writes and who reads it."""

    topic: str
    summary: str
    key: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    contracts: tuple[str, ...] = ()  # schema names, e.g. "vigil.telemetry.v1"
    internal: tuple[InternalMessage, ...] = ()


KAFKA_CHANNELS: Final[tuple[KafkaChannel, ...]] = (
    KafkaChannel(
        kafka_topics.TELEMETRY_TOPIC,
        "Every device message ingest accepted, bound to the patient the device was bound to at "
        "the message's device time. Keyed by patient so each patient's events stay in order on "
        "one partition. At least once: a crash of ingest can repeat a record (same message_id).",
        key="The patient id.",
        producers=("ingest",),
        consumers=("rules", "replay"),
        contracts=("vigil.telemetry.v1",),
    ),
    KafkaChannel(
        kafka_topics.ALERTS_TOPIC,
        "Each phase of an alert the rules decided (raised, updated, resolved), written in the "
        "same Kafka transaction as the rules state that led to it.",
        key="The patient id.",
        producers=("rules",),
        consumers=("notify",),
        contracts=("vigil.alert.v1",),
    ),
    KafkaChannel(
        kafka_topics.DEADLETTER_TOPIC,
        "Every input a service could not accept, with a stable reason code, the source topic "
        "and the raw payload (cut to 64 KiB); the pipeline keeps flowing.",
        key=(
            "From ingest, the device id of the MQTT topic (no key when the topic has none); "
            "from rules and notify, no key."
        ),
        producers=("ingest", "rules", "notify"),
        consumers=(),
        contracts=("vigil.deadletter.v1",),
    ),
    KafkaChannel(
        kafka_topics.RULES_STATE_TOPIC,
        "The rules service's own state, compacted: the newest record per key is kept. Written "
        "in the same transaction as the alerts it led to; read back when a partition is "
        "assigned and by replay. Internal: its records are not a contract.",
        key="See each message.",
        producers=("rules",),
        consumers=("rules", "replay"),
        internal=(
            InternalMessage(
                "rules.patient-state",
                "The rule clocks and open alerts of one patient.",
                key="The patient id (on the partition of that patient's telemetry).",
            ),
            InternalMessage(
                "rules.partition-watermark",
                "How far the rules have read the telemetry partition of the same number.",
                key="'__meta__/{partition}'.",
            ),
            InternalMessage(
                "rules.config",
                "A rules configuration the service pinned, so a replay can pin the same "
                "version: its label, content hash, number of patient profiles, and the "
                "configuration without them (the profiles are in PostgreSQL, in pieces).",
                key="'__config__/{config_version}', always on partition 0.",
            ),
        ),
    ),
)

#: Topics the stack creates that no service writes today, with why they still exist.
RESERVED_TOPICS: Final[dict[str, str]] = {}

#: Contracts schemas.export publishes that no topic carries, with where they live instead.
CONTRACTS_ON_NO_TOPIC: Final[dict[str, str]] = {
    "vigil.page.v1": "notify keeps its pages in PostgreSQL; no Kafka topic carries them",
    "vigil.delivery.v1": (
        "notify records every delivery attempt in PostgreSQL (delivery log and alert timeline); "
        "no Kafka topic carries them"
    ),
}


def kafka_topic_names() -> dict[str, str]:
    """Every topic constant of ``schemas.kafka_topics``: constant name -> topic."""
    return {
        name: value
        for name, value in vars(kafka_topics).items()
        if name.endswith("_TOPIC") and isinstance(value, str)
    }


def _contracts_by_schema() -> dict[str, Contract]:
    return {contract.schema_name: contract for contract in CONTRACTS}


def _schema_ref(contract: Contract) -> str:
    # Relative to this document, which sits beside the json/ directory.
    return f"{SCHEMA_DIR.name}/{contract.filename}"


def _contract_message(contract: Contract, bindings: dict[str, Any] | None) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": contract.schema_name,
        "title": contract.model.__name__,
        "summary": contract.description,
        "contentType": "application/json",
        "payload": {"schemaFormat": SCHEMA_FORMAT, "schema": {"$ref": _schema_ref(contract)}},
    }
    if bindings:
        message["bindings"] = bindings
    return message


def _kafka_key_binding(description: str) -> dict[str, Any]:
    return {
        "kafka": {
            "key": {"type": "string", "description": description},
            "bindingVersion": KAFKA_BINDING_VERSION,
        }
    }


def _server_variables(port: int) -> dict[str, Any]:
    return {
        "host": {"default": LOCAL_HOST, "description": "Given by the operator."},
        "port": {"default": str(port), "description": "Given by the operator."},
    }


def _servers() -> dict[str, Any]:
    mqtt_bindings = {"mqtt": {"cleanSession": False, "bindingVersion": MQTT_BINDING_VERSION}}
    device_security = [{"$ref": "#/components/securitySchemes/devicePassword"}]
    return {
        "mqtt": {
            "host": "{host}:{port}",
            "protocol": "mqtt",
            "title": "MQTT broker, plain listener",
            "description": (
                "MQTT 3.1.1 or 5.0 without TLS. The defaults are the local development stack's, "
                "which listens on loopback only; anywhere else devices use the TLS listener."
            ),
            "variables": _server_variables(LOCAL_MQTT_PORT),
            "security": device_security,
            "bindings": mqtt_bindings,
        },
        "mqtts": {
            "host": "{host}:{port}",
            "protocol": "secure-mqtt",
            "title": "MQTT broker, TLS listener",
            "description": (
                "The same broker, accounts and ACL over TLS 1.2 or newer. The server certificate "
                "is signed by the CA the operator hands out (on the local stack, "
                "<data_dir>/tls/ca.crt; docs/mqtt.md, section 1.2)."
            ),
            "variables": _server_variables(LOCAL_MQTT_TLS_PORT),
            "security": device_security,
            "bindings": mqtt_bindings,
        },
        "kafka": {
            "host": "{host}:{port}",
            "protocol": "kafka",
            "title": "Kafka cluster (internal)",
            "description": "Between Vigil's services only; devices never reach it.",
            "variables": _server_variables(LOCAL_KAFKA_PORT),
        },
    }


def _mqtt_channel_id(channel: str) -> str:
    return f"device.{channel}"


def build_document() -> dict[str, Any]:
    """The AsyncAPI document as the code defines it now."""
    contracts = _contracts_by_schema()
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    mqtt_servers = [{"$ref": "#/servers/mqtt"}, {"$ref": "#/servers/mqtts"}]

    for channel, schema_name in sorted(CHANNEL_SCHEMAS.items()):
        contract = contracts[schema_name]
        messages[schema_name] = _contract_message(contract, None)
        channel_id = _mqtt_channel_id(channel)
        channels[channel_id] = {
            "address": f"{MQTT_PREFIX}/{{device_id}}/{channel}",
            "title": f"Device channel '{channel}'",
            "description": (
                f"Accepts only payloads whose 'schema' is '{schema_name}'; anything else is "
                "dead-lettered on vigil.deadletter.v1 with a reason (docs/mqtt.md, section 5)."
            ),
            "servers": mqtt_servers,
            "parameters": {"device_id": {"description": _DEVICE_ID_DESCRIPTION}},
            "messages": {schema_name: {"$ref": f"#/components/messages/{schema_name}"}},
        }
        operations[f"ingest.receive.{channel}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "summary": (
                f"Devices publish on '{channel}' with QoS 1 and retain 0; ingest reads it "
                f"through a shared subscription ($share/<group>/{MQTT_PREFIX}/#)."
            ),
            "bindings": {
                "mqtt": {"qos": 1, "retain": False, "bindingVersion": MQTT_BINDING_VERSION}
            },
        }

    ack = contracts[ACK_SCHEMA]
    messages[ACK_SCHEMA] = _contract_message(ack, None)
    channels["device.ack"] = {
        "address": f"{ACK_PREFIX}/{{device_id}}",
        "title": "End-to-end acknowledgements to a device",
        "description": (
            "Ingest answers every message of a device once it is stored in Kafka and PostgreSQL "
            "(or rejected for good, with its reason), batched per device. Only ingest may write "
            "here; only the device itself (or the hub publishing for it) may read. A device "
            "keeps each message until it is answered here and sends it again, unchanged, after "
            "a timeout (docs/mqtt.md, section 4.1)."
        ),
        "servers": mqtt_servers,
        "parameters": {"device_id": {"description": _DEVICE_ID_DESCRIPTION}},
        "messages": {ACK_SCHEMA: {"$ref": f"#/components/messages/{ACK_SCHEMA}"}},
    }
    operations["ingest.send.ack"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/device.ack"},
        "summary": (
            "Ingest publishes with QoS 1, retain 0, after the messages it answers are durable; "
            "devices subscribe with QoS 1 and a persistent session."
        ),
        "bindings": {"mqtt": {"qos": 1, "retain": False, "bindingVersion": MQTT_BINDING_VERSION}},
    }

    for spec in KAFKA_CHANNELS:
        channel_id = spec.topic
        refs: dict[str, Any] = {}
        for schema_name in spec.contracts:
            message_id = f"kafka.{schema_name}"
            messages[message_id] = _contract_message(
                contracts[schema_name], _kafka_key_binding(spec.key)
            )
            refs[message_id] = {"$ref": f"#/components/messages/{message_id}"}
        for internal in spec.internal:
            messages[internal.name] = {
                "name": internal.name,
                "summary": internal.summary,
                "contentType": "application/json",
                "payload": {
                    "schemaFormat": SCHEMA_FORMAT,
                    "schema": {"type": "object", "description": "Internal; no contract."},
                },
                "bindings": _kafka_key_binding(internal.key),
            }
            refs[internal.name] = {"$ref": f"#/components/messages/{internal.name}"}
        channels[channel_id] = {
            "address": spec.topic,
            "description": f"{spec.summary}\n\nKey: {spec.key}",
            "servers": [{"$ref": "#/servers/kafka"}],
            "messages": refs,
        }
        for action, services in (("send", spec.producers), ("receive", spec.consumers)):
            for service in services:
                operations[f"{service}.{action}.{spec.topic}"] = {
                    "action": action,
                    "channel": {"$ref": f"#/channels/{channel_id}"},
                    "summary": f"{service} {'writes' if action == 'send' else 'reads'} "
                    f"{spec.topic}.",
                }

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Vigil device and event interfaces",
            "version": "1",
            "description": (
                "Home thermometers and infusion pumps publish over MQTT; ingest validates each "
                "message and writes it to Kafka keyed by patient; rules and notify follow. "
                "Generated by `python -m schemas.asyncapi` from schemas/topics.py, "
                "schemas/kafka_topics.py and schemas/asyncapi.py; payloads are the JSON Schema "
                "files in schemas/json/. The device contract in prose is docs/mqtt.md."
                + "".join(
                    f" Reserved, written by no service: {topic} ({why})."
                    for topic, why in sorted(RESERVED_TOPICS.items())
                )
            ),
        },
        "defaultContentType": "application/json",
        "servers": _servers(),
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "securitySchemes": {
                "devicePassword": {
                    "type": "userPassword",
                    "description": (
                        "MQTT username = the device id, password issued per device by the "
                        "operator (rotated and revoked by the project). Service accounts "
                        "start with 'vigil-'."
                    ),
                }
            },
        },
    }


def generate() -> str:
    return render(build_document())


def is_stale(path: Path = DOCUMENT_FILE) -> bool:
    return not path.exists() or path.read_text(encoding="utf-8") != generate()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m schemas.asyncapi",
        description="Generate the AsyncAPI document of the MQTT and Kafka interfaces.",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the file is stale"
    )
    parser.add_argument("--out", type=Path, default=DOCUMENT_FILE, help="output file")
    args = parser.parse_args(argv)
    if args.check:
        if is_stale(args.out):
            print(f"stale: {args.out}; run: python -m schemas.asyncapi", file=sys.stderr)
            return 1
        return 0
    if is_stale(args.out):
        args.out.write_text(generate(), encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
