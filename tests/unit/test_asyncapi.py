"""The AsyncAPI document: the committed file is what the code generates, it covers every MQTT
channel, Kafka topic and message contract, and every reference in it resolves."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas import asyncapi
from schemas.export import CONTRACTS, SCHEMA_DIR, generate
from schemas.kafka_topics import ALERTS_TOPIC, TELEMETRY_TOPIC
from schemas.topics import CHANNEL_SCHEMAS


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(asyncapi.DOCUMENT_FILE.read_text(encoding="utf-8"))
    return loaded


def refs(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every ``$ref`` value in ``node`` with where it sits."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield path, value
            else:
                yield from refs(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from refs(value, f"{path}/{index}")


def resolve_pointer(document: dict[str, Any], pointer: str) -> Any:
    node: Any = document
    for part in pointer.removeprefix("#/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[part]  # a KeyError is an unresolved reference
    return node


def test_committed_document_is_what_the_code_generates() -> None:
    """schemas/asyncapi.json is current; after changing a topic, channel or contract, run
    `python -m schemas.asyncapi` (the same check as `python -m schemas.asyncapi --check`)."""
    assert not asyncapi.is_stale(), "stale schemas/asyncapi.json: run python -m schemas.asyncapi"


def test_check_mode_reports_a_stale_file_and_writing_fixes_it(tmp_path: Path) -> None:
    """--check exits 1 on a missing or edited file and writes nothing; a plain run writes it."""
    out = tmp_path / "asyncapi.json"
    assert asyncapi.main(["--check", "--out", str(out)]) == 1
    assert not out.exists()
    assert asyncapi.main(["--out", str(out)]) == 0
    assert asyncapi.main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text().replace('"3.0.0"', '"2.6.0"'))
    assert asyncapi.main(["--check", "--out", str(out)]) == 1


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    """Internal references point at something in the document; file references point at a JSON
    Schema that schemas.export generates and that exists beside the document."""
    exported = set(generate())
    found = list(refs(document))
    assert found
    for where, ref in found:
        if ref.startswith("#/"):
            resolve_pointer(document, ref)
        else:
            target = asyncapi.DOCUMENT_FILE.parent / ref
            assert target.parent == SCHEMA_DIR, (where, ref)
            assert target.name in exported and target.is_file(), (where, ref)


def test_every_channel_has_a_message_and_every_operation_a_channel(
    document: dict[str, Any],
) -> None:
    """No channel without a message, no operation on a channel that does not exist, and every
    component message is used by some channel."""
    used: set[str] = set()
    for channel_id, channel in document["channels"].items():
        assert channel["messages"], channel_id
        for ref in channel["messages"].values():
            used.add(ref["$ref"])
        for server in channel["servers"]:
            resolve_pointer(document, server["$ref"])
    for operation_id, operation in document["operations"].items():
        assert operation["action"] in {"send", "receive"}, operation_id
        assert operation["channel"]["$ref"].removeprefix("#/channels/") in document["channels"]
    declared = {f"#/components/messages/{name}" for name in document["components"]["messages"]}
    assert declared == used


def test_every_mqtt_channel_carries_its_contract_at_qos_1(document: dict[str, Any]) -> None:
    """Each device channel of schemas.topics is a channel whose only message is the JSON Schema
    of the schema value that channel accepts, received by ingest at QoS 1 without retain."""
    files = {contract.schema_name: contract.filename for contract in CONTRACTS}
    for channel, schema_name in CHANNEL_SCHEMAS.items():
        entry = document["channels"][f"device.{channel}"]
        assert entry["address"] == f"vigil/v1/dev/{{device_id}}/{channel}"
        assert "device_id" in entry["parameters"]
        (ref,) = entry["messages"].values()
        message = resolve_pointer(document, ref["$ref"])
        assert message["payload"]["schema"]["$ref"] == f"json/{files[schema_name]}"
        schema_file = json.loads((SCHEMA_DIR / files[schema_name]).read_text())
        assert schema_file["properties"]["schema"]["const"] == schema_name
        binding = document["operations"][f"ingest.receive.{channel}"]["bindings"]["mqtt"]
        assert (binding["qos"], binding["retain"]) == (1, False)


def test_every_kafka_topic_is_described_or_reserved_with_a_reason(
    document: dict[str, Any],
) -> None:
    """A topic added to schemas.kafka_topics fails this test until asyncapi.py says what it
    carries, how it is keyed and who uses it, or why it is reserved."""
    channels = {channel["address"] for channel in document["channels"].values()}
    for constant, topic in asyncapi.kafka_topic_names().items():
        described = topic in channels
        reserved = topic in asyncapi.RESERVED_TOPICS
        assert described != reserved, f"{constant} ({topic}): described={described}"
    for spec in asyncapi.KAFKA_CHANNELS:
        assert spec.producers, spec.topic
        for ref in document["channels"][spec.topic]["messages"].values():
            message = resolve_pointer(document, ref["$ref"])
            assert message["bindings"]["kafka"]["key"]["type"] == "string", spec.topic


def test_every_contract_travels_on_a_channel_or_says_why_not(document: dict[str, Any]) -> None:
    """Each contract schemas.export publishes is a message of some channel, unless it is listed
    as carried by no topic (and then it is really on none)."""
    on_channels = {
        ref["$ref"].rpartition("/")[2].removeprefix("kafka.")
        for channel in document["channels"].values()
        for ref in channel["messages"].values()
    }
    for contract in CONTRACTS:
        name = contract.schema_name
        assert (name in on_channels) != (name in asyncapi.CONTRACTS_ON_NO_TOPIC), name


def test_telemetry_and_alerts_are_keyed_by_patient(document: dict[str, Any]) -> None:
    """The ordering guarantee consumers rely on: one patient's events share a key."""
    for topic in (TELEMETRY_TOPIC, ALERTS_TOPIC):
        for ref in document["channels"][topic]["messages"].values():
            key = resolve_pointer(document, ref["$ref"])["bindings"]["kafka"]["key"]
            assert key["description"] == "The patient id.", topic


def test_server_defaults_are_the_local_stacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The document's example ports are the development stack's defaults, TLS port included."""
    from vigil_tools.stack import StackSettings

    for key in list(os.environ):
        if key.startswith("VIGIL_STACK_"):
            monkeypatch.delenv(key)
    defaults = StackSettings()
    servers = asyncapi.build_document()["servers"]
    assert servers["mqtt"]["variables"]["port"]["default"] == str(defaults.mqtt_port)
    assert servers["mqtts"]["variables"]["port"]["default"] == str(defaults.mqtt_tls_port)
    assert servers["kafka"]["variables"]["port"]["default"] == str(defaults.kafka_port)
    assert servers["mqtts"]["protocol"] == "secure-mqtt"
