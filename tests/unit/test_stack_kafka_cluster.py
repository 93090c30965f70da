"""The local stack's three-node Kafka mode (VIGIL_STACK_KAFKA_BROKERS=3), checked without starting
anything: each node's configuration, the topics' replication, the bootstrap list, the settings'
checks; and that the single-broker default is what it was."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from vigil_tools.stack import StackSettings, kafka
from vigil_tools.stack.stack import components
from vigil_tools.stack.topics import topic_specs

CLUSTER_PORTS = (14092, 14093, 14094, 14095)


def settings(tmp_path: Path, brokers: int = 3, **extra: object) -> StackSettings:
    fields: dict[str, object] = {
        "data_dir": tmp_path / "stack",
        "mqtt_port": 14083,
        "kafka_port": 14090,
        "kafka_controller_port": 14091,
        "pg_port": 14432,
        "smtp_port": 14025,
        "kafka_brokers": brokers,
        **extra,
    }
    if brokers == 3:
        fields.setdefault("kafka_cluster_ports", CLUSTER_PORTS)
    return StackSettings(**fields)  # type: ignore[arg-type]


def properties(text: str) -> dict[str, str]:
    return dict(
        line.split("=", 1)
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    )


def test_each_node_is_a_broker_and_a_voter_of_one_static_quorum(tmp_path: Path) -> None:
    stack = settings(tmp_path)
    rendered = {node: properties(kafka.render_server_properties(stack, node)) for node in (1, 2, 3)}
    voters = "1@127.0.0.1:14091,2@127.0.0.1:14093,3@127.0.0.1:14095"
    for node, (client, controller) in {
        1: (14090, 14091),
        2: (14092, 14093),
        3: (14094, 14095),
    }.items():
        conf = rendered[node]
        assert conf["node.id"] == str(node)
        assert conf["process.roles"] == "broker,controller"
        assert conf["controller.quorum.voters"] == voters
        assert conf["listeners"] == (
            f"PLAINTEXT://127.0.0.1:{client},CONTROLLER://127.0.0.1:{controller}"
        )
        assert conf["log.dirs"] == str(kafka.log_dir(stack, node))
        assert "controller.quorum.bootstrap.servers" not in conf
        for key in (
            "default.replication.factor",
            "offsets.topic.replication.factor",
            "transaction.state.log.replication.factor",
            "share.coordinator.state.topic.replication.factor",
        ):
            assert conf[key] == "3", key
        for key in (
            "min.insync.replicas",
            "transaction.state.log.min.isr",
            "share.coordinator.state.topic.min.isr",
        ):
            assert conf[key] == "2", key
        assert conf["unclean.leader.election.enable"] == "false"
    assert len({str(kafka.log_dir(stack, node)) for node in (1, 2, 3)}) == 3


def test_cluster_topics_are_replicated_three_times_and_need_two_in_sync(tmp_path: Path) -> None:
    for spec in topic_specs(6, replication_factor=3):
        assert spec.replication_factor == 3
        assert spec.configs()["min.insync.replicas"] == "2"


def test_the_single_broker_default_is_unchanged(tmp_path: Path) -> None:
    stack = settings(tmp_path, brokers=1)
    assert StackSettings.model_fields["kafka_brokers"].default == 1
    for spec in topic_specs(6):
        assert spec.replication_factor == 1
        assert set(spec.configs()) == {"retention.ms", "cleanup.policy"}
    conf = properties(kafka.render_server_properties(stack))
    assert conf["node.id"] == "1"
    assert conf["controller.quorum.bootstrap.servers"] == "127.0.0.1:14091"
    assert conf["min.insync.replicas"] == "1"
    assert kafka.bootstrap_servers(stack) == "127.0.0.1:14090"
    assert [c.name for c in components(stack)] == ["mosquitto", "kafka", "postgres", "mailsink"]


def test_cluster_bootstrap_lists_every_node_and_status_every_component(tmp_path: Path) -> None:
    stack = settings(tmp_path)
    assert kafka.bootstrap_servers(stack) == "127.0.0.1:14090,127.0.0.1:14092,127.0.0.1:14094"
    names = [c.name for c in components(stack)]
    assert names == ["mosquitto", "kafka", "kafka-2", "kafka-3", "postgres", "mailsink"]
    assert [c.port for c in components(stack)][1:4] == [14090, 14092, 14094]


def test_a_cluster_needs_its_ports_and_they_must_be_free_of_the_others(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="KAFKA_CLUSTER_PORTS"):
        settings(tmp_path, kafka_cluster_ports=(14092, 14093))
    with pytest.raises(ValidationError, match="must all differ"):
        settings(tmp_path, kafka_cluster_ports=(14092, 14093, 14094, 14090))
    with pytest.raises(ValidationError):
        settings(tmp_path, brokers=2)
