"""The local stack's generated configuration and bookkeeping, checked without starting anything."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from schemas import kafka_topics
from vigil_tools.stack import (
    StackError,
    StackSettings,
    down,
    kafka,
    mosquitto,
    postgres,
    stack_env,
    status,
)
from vigil_tools.stack.credentials import StackSecrets
from vigil_tools.stack.mailsink import MaildirHandler, message_file_name
from vigil_tools.stack.process import Component, running_pid
from vigil_tools.stack.topics import DAY_MS, topic_specs


def make_settings(data_dir: Path, smtp_port: int = 20025) -> StackSettings:
    """A stack on the test ports (never the defaults), in ``data_dir``."""
    return StackSettings(
        data_dir=data_dir,
        mqtt_port=21883,
        kafka_port=29092,
        kafka_controller_port=29093,
        pg_port=25432,
        smtp_port=smtp_port,
    )


@pytest.fixture
def settings(tmp_path: Path) -> StackSettings:
    return make_settings(tmp_path / "stack")


def directives(text: str) -> dict[str, list[str]]:
    """Non-comment lines of a Mosquitto-style file, as directive -> every value it was given."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, _, value = stripped.partition(" ")
        found.setdefault(key, []).append(value.strip())
    return found


def properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip() and line[0] != "#")
    return {key.strip(): value.strip() for key, value in pairs}


# Settings.


def test_settings_read_prefixed_env_and_resolve_data_dir_against_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VIGIL_STACK_* configure the stack, and a relative data dir is made absolute from the cwd,
    so child processes and pid files never depend on their own working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VIGIL_STACK_DATA_DIR", ".vigil-test")
    monkeypatch.setenv("VIGIL_STACK_MQTT_PORT", "21883")
    configured = StackSettings()
    assert configured.data_dir == tmp_path.resolve() / ".vigil-test"
    assert configured.mqtt_port == 21883
    assert (configured.repo_root / "deploy" / "local" / "kafka" / "pom.xml").is_file()


def test_settings_defaults_match_the_documented_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without overrides the stack uses the documented ports and 6 partitions."""
    for key in list(os.environ):
        if key.startswith("VIGIL_STACK_"):
            monkeypatch.delenv(key)
    defaults = StackSettings()
    assert (
        defaults.mqtt_port,
        defaults.kafka_port,
        defaults.kafka_controller_port,
        defaults.pg_port,
        defaults.smtp_port,
    ) == (11883, 19092, 19093, 15432, 10025)
    assert defaults.kafka_partitions == 6
    assert defaults.kafka_heap_mb == 512
    assert defaults.data_dir.name == ".vigil"


def test_settings_reject_two_components_on_one_port(tmp_path: Path) -> None:
    """A port shared by two components is a configuration error, caught before anything runs."""
    with pytest.raises(ValueError, match="ports must all differ"):
        make_settings(tmp_path, smtp_port=21883)


# Mosquitto.


def test_mosquitto_listens_on_loopback_only_with_authentication(settings: StackSettings) -> None:
    """The broker binds 127.0.0.1 on the configured port and refuses anonymous clients."""
    conf = directives(mosquitto.render_conf(settings))
    assert conf["listener"] == ["21883 127.0.0.1", "21884 127.0.0.1"]
    assert conf["allow_anonymous"] == ["false"]
    assert conf["password_file"] == [str(settings.mosquitto_dir / "passwd")]
    assert conf["acl_file"] == [str(settings.mosquitto_dir / "acl")]
    assert "bind_address" not in conf and "port" not in conf


def test_mosquitto_never_drops_queued_qos1_messages(settings: StackSettings) -> None:
    """No count or byte limit on a subscriber's queue (the default 1000 drops QoS 1 messages),
    and the queue survives a broker restart through persistence."""
    conf = directives(mosquitto.render_conf(settings))
    assert conf["max_queued_messages"] == ["0"]
    assert conf["max_queued_bytes"] == ["0"]
    assert int(conf["max_inflight_messages"][0]) > 20
    assert conf["persistence"] == ["true"]
    assert conf["persistence_location"] == [str(settings.mosquitto_dir)]
    assert int(conf["autosave_interval"][0]) <= 300
    assert conf["persistent_client_expiration"] == ["7d"]


def test_mosquitto_lets_a_10_mb_payload_reach_ingest(settings: StackSettings) -> None:
    """The packet cap is above 10 MB, so an oversized payload reaches ingest to be dead-lettered
    with a reason instead of disconnecting the device with nothing recorded."""
    conf = directives(mosquitto.render_conf(settings))
    assert int(conf["max_packet_size"][0]) >= 10 * 1024 * 1024 + 1024
    assert "message_size_limit" not in conf


def test_mosquitto_acl_pins_devices_to_their_own_topics(settings: StackSettings) -> None:
    """Devices write only under their own id (%u) and read only their own acknowledgements;
    ingest reads all device topics, owns the system channel and alone writes acknowledgements;
    the simulator (the fleet's gateway) writes device topics and reads their acknowledgements."""
    acl = mosquitto.render_acl(settings)
    lines = [line.strip() for line in acl.splitlines() if line.strip() and line[0] != "#"]
    assert lines == [
        "pattern write vigil/v1/dev/%u/#",
        "pattern read vigil/v1/ack/%u",
        "user vigil-ingest",
        "topic read vigil/v1/dev/#",
        "topic readwrite vigil/v1/system/#",
        "topic write vigil/v1/ack/#",
        "user vigil-sim",
        "topic write vigil/v1/dev/#",
        "topic read vigil/v1/ack/#",
    ]
    assert "$share/" in acl  # the escaped $$ of the template rendered in the comment


@pytest.mark.parametrize("device_id", ["", "a/b", "dev+", "dev#", "vigil-ingest", "x" * 65, "a b"])
def test_device_ids_that_could_escape_the_acl_are_refused(
    settings: StackSettings, device_id: str
) -> None:
    """Ids with MQTT wildcards, separators or the reserved prefix never reach the password file."""
    with pytest.raises(ValueError):
        mosquitto.add_device_credential(settings, device_id)
    assert not settings.data_dir.exists()


def test_device_credentials_need_a_stack_first(settings: StackSettings) -> None:
    """Adding a device before the first `up` fails clearly instead of leaving a half-made data
    directory that `up` would then refuse to adopt."""
    with pytest.raises(StackError, match="no local stack"):
        mosquitto.add_device_credential(settings, "dev-0001")
    assert not settings.data_dir.exists()


# Kafka.


def test_kafka_properties_use_the_given_ports_on_loopback(settings: StackSettings) -> None:
    """Client and controller listeners bind 127.0.0.1 on the configured ports; data under
    data_dir; single-node replication; no automatic topic creation."""
    props = properties(kafka.render_server_properties(settings))
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093"
    assert props["advertised.listeners"] == props["listeners"]
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:29093"
    assert props["process.roles"] == "broker,controller"
    assert props["log.dirs"] == str(settings.kafka_dir / "data")
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["auto.create.topics.enable"] == "false"


def test_kafka_jvm_gets_the_configured_heap(settings: StackSettings) -> None:
    """kafka_heap_mb sets both -Xms and -Xmx, and the jars come from the shared cache."""
    argv = kafka.java_argv(
        settings.model_copy(update={"kafka_heap_mb": 768}), "kafka.Kafka", "x", heap_mb=768
    )
    assert "-Xms768m" in argv and "-Xmx768m" in argv
    assert f"{settings.kafka_libs_dir}/*" in argv
    assert not settings.kafka_libs_dir.is_relative_to(settings.data_dir)


def test_cluster_ids_have_kafkas_format() -> None:
    """Generated cluster ids are 16 random bytes in unpadded URL-safe base64, never starting with
    '-' (Kafka's own Uuid rules), so StorageTool accepts them."""
    for _ in range(200):
        cluster_id = kafka.new_cluster_id()
        assert len(cluster_id) == 22 and not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_topic_specs_cover_every_contract_topic() -> None:
    """Each topic name of schemas.kafka_topics is created, with the agreed partitions and
    retention; kafka_partitions applies to telemetry and alerts only."""
    specs = {spec.name: spec for spec in topic_specs(partitions=4)}
    contract = {
        value
        for name, value in vars(kafka_topics).items()
        if name.endswith("_TOPIC") and isinstance(value, str)
    }
    assert set(specs) == contract
    expected = {
        kafka_topics.TELEMETRY_TOPIC: (4, 30),
        kafka_topics.ALERTS_TOPIC: (4, 365),
        kafka_topics.DEADLETTER_TOPIC: (3, 30),
    }
    for name, (partitions, days) in expected.items():
        assert specs[name].partitions == partitions
        assert specs[name].retention_ms == days * DAY_MS
        assert specs[name].replication_factor == 1
        assert specs[name].configs() == {
            "retention.ms": str(days * DAY_MS),
            "cleanup.policy": "delete",
        }


# PostgreSQL.


@pytest.mark.parametrize("timescaledb", [False, True])
def test_postgres_listens_on_loopback_with_a_private_socket(
    settings: StackSettings, timescaledb: bool
) -> None:
    """TCP on 127.0.0.1 at pg_port only; the Unix socket inside data_dir; SCRAM passwords; and
    TimescaleDB preloaded only when installed."""
    conf = postgres.render_postgresql_conf(settings, timescaledb=timescaledb)
    assert "listen_addresses = '127.0.0.1'" in conf
    assert "port = 25432" in conf
    assert f"unix_socket_directories = '{settings.postgres_dir / 'run'}'" in conf
    assert "password_encryption = 'scram-sha-256'" in conf
    preload = "timescaledb" if timescaledb else ""
    assert f"shared_preload_libraries = '{preload}'" in conf
    assert ("timescaledb.telemetry_level = off" in conf) is timescaledb


def test_pg_hba_trusts_nobody(settings: StackSettings) -> None:
    """Every rule asks for a SCRAM password; the superuser may only use the socket and the app
    role only its own database."""
    rules = [
        line.split()
        for line in postgres.render_pg_hba(settings).splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules == [
        ["local", "all", "postgres", "scram-sha-256"],
        ["local", "vigil", "vigil", "scram-sha-256"],
        ["host", "vigil", "vigil", "127.0.0.1/32", "scram-sha-256"],
    ]


def test_app_dsn_targets_the_vigil_role_and_database(settings: StackSettings) -> None:
    """The DSN handed to services uses the unprivileged role over loopback TCP."""
    dsn = postgres.app_dsn(settings, "pw")
    assert dsn == "postgresql://vigil:pw@127.0.0.1:25432/vigil"


# Environment, status and stop without a running stack.


def test_stack_env_needs_the_generated_secrets(settings: StackSettings) -> None:
    """Before the first `up` there are no secrets, and stack_env says how to create them."""
    with pytest.raises(StackError, match=re.escape("run `python -m vigil_tools.stack up`")):
        stack_env(settings)


def test_stack_env_exposes_exactly_what_services_read(settings: StackSettings) -> None:
    """The env has exactly the agreed keys, all pointing at loopback and this stack's ports."""
    secrets = StackSecrets()
    settings.data_dir.mkdir(parents=True)
    settings.secrets_file.write_text(secrets.model_dump_json())
    env = stack_env(settings)
    assert env == {
        "VIGIL_ENVIRONMENT": "development",
        "VIGIL_MQTT_HOST": "127.0.0.1",
        "VIGIL_MQTT_PORT": "21883",
        "VIGIL_MQTT_TLS_PORT": "21884",
        "VIGIL_MQTT_TLS_CA_FILE": str(settings.data_dir / "tls" / "ca.crt"),
        "VIGIL_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:29092",
        "VIGIL_PG_DSN": f"postgresql://vigil:{secrets.pg_vigil_password}@127.0.0.1:25432/vigil",
        "VIGIL_INGEST_MQTT_USERNAME": "vigil-ingest",
        "VIGIL_INGEST_MQTT_PASSWORD": secrets.mqtt_ingest_password,
        "VIGIL_SIM_MQTT_USERNAME": "vigil-sim",
        "VIGIL_SIM_MQTT_PASSWORD": secrets.mqtt_sim_password,
        "VIGIL_NOTIFY_SMTP_HOST": "127.0.0.1",
        "VIGIL_NOTIFY_SMTP_PORT": "20025",
        "VIGIL_STACK_DATA_DIR": str(settings.data_dir),
    }
    assert len(set(json.loads(secrets.model_dump_json()).values())) == 4  # all distinct


def test_stale_and_recycled_pid_files_do_not_count_as_running(tmp_path: Path) -> None:
    """A pid file naming a dead process, or a live process that is not this stack's (a recycled
    pid), reads as not running."""
    pid_file = tmp_path / "x.pid"
    comp = Component("x", pid_file, tmp_path / "x.log", marker=str(tmp_path / "conf"), port=1)
    assert running_pid(comp) is None  # no pid file
    pid_file.write_text("999999999\n")
    assert running_pid(comp) is None  # no such process
    pid_file.write_text(f"{os.getpid()}\n")
    assert running_pid(comp) is None  # alive, but its command line does not name our config
    pid_file.write_text("garbage\n")
    assert running_pid(comp) is None


def test_status_and_down_are_safe_when_nothing_ever_ran(settings: StackSettings) -> None:
    """status reports every component stopped and down (even with purge) does nothing when
    the data dir does not exist."""
    report = status(settings)
    assert set(report) == {"mosquitto", "kafka", "postgres", "mailsink"}
    assert all(info["running"] is False and info["pid"] is None for info in report.values())
    assert report["kafka"]["port"] == 29092 and report["kafka"]["controller_port"] == 29093
    down(settings)
    down(settings, purge=True)
    assert not settings.data_dir.exists()


def test_purge_refuses_a_directory_the_stack_did_not_create(tmp_path: Path) -> None:
    """A mistyped VIGIL_STACK_DATA_DIR pointing at real files is never deleted."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(StackError, match="refusing to delete"):
        down(make_settings(precious), purge=True)
    assert (precious / "notes.txt").exists()


# Mail sink.


def test_message_file_names_sort_by_arrival_and_never_collide() -> None:
    """Two messages in the same microsecond get distinct names with the same sortable prefix."""
    moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    first, second = message_file_name(moment), message_file_name(moment)
    assert first != second
    assert first.startswith("20260102T030405.678901Z-") and first.endswith(".eml")


def test_mail_sink_writes_each_message_as_one_eml(tmp_path: Path) -> None:
    """A received message becomes one .eml holding the envelope and the original bytes, with no
    temporary file left behind."""
    handler = MaildirHandler(tmp_path)
    envelope = SimpleNamespace(
        mail_from="notify@vigil.local",
        rcpt_tos=["oncall@example.org"],
        original_content=b"Subject: PAGE\r\n\r\nbody\r\n",
    )
    session = SimpleNamespace(peer=("127.0.0.1", 5000))
    reply = asyncio.run(handler.handle_DATA(None, session, envelope))  # type: ignore[arg-type]
    assert reply.startswith("250")
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".eml"
    content = files[0].read_bytes()
    assert b"X-Vigil-Envelope-To: oncall@example.org\r\n" in content
    assert content.endswith(b"Subject: PAGE\r\n\r\nbody\r\n")
