"""Settings of the local stack: where its state lives, which ports it binds, which binaries it runs.

Every path and port of a stack comes from here, so two stacks (the developer's ``.vigil`` and the
tests' ``.vigil-test``) can run side by side by changing only ``VIGIL_STACK_*`` variables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vigil_tools.stack.topics import DEFAULT_PARTITIONS

KAFKA_VERSION = "4.1.0"


def find_repo_root(start: Path | None = None) -> Path:
    """The nearest ancestor of ``start`` (default: this file) holding ``deploy/local``.

    The templates under ``deploy/local`` are not packaged; the stack is a developer tool run from
    a checkout, so walking up from the source is enough.
    """
    here = (start or Path(__file__)).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "deploy" / "local").is_dir():
            return candidate
    raise RuntimeError(f"no deploy/local directory above {here}; is this a Vigil checkout?")


def _default_kafka_libs_dir() -> Path:
    # Outside data_dir on purpose: `down --purge` must not force a 90-jar download again.
    return Path.home() / ".cache" / "vigil" / f"kafka-{KAFKA_VERSION}" / "libs"


class StackSettings(BaseSettings):
    """Where and how the local stack runs. Every field reads ``VIGIL_STACK_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="VIGIL_STACK_", extra="ignore")

    data_dir: Path = Path(".vigil")
    repo_root: Path = Field(default_factory=find_repo_root)

    mqtt_port: int = Field(default=11883, ge=1, le=65535)
    # Mosquitto's TLS listener. 0 means mqtt_port + 1, so the development stack (11883/11884),
    # the test stack (21883/21884) and private stacks never collide without a variable per stack.
    mqtt_tls_port: int = Field(default=0, ge=0, le=65535)
    kafka_port: int = Field(default=19092, ge=1, le=65535)
    kafka_controller_port: int = Field(default=19093, ge=1, le=65535)
    pg_port: int = Field(default=15432, ge=1, le=65535)
    smtp_port: int = Field(default=10025, ge=1, le=65535)

    # Mosquitto's persistence (deploy/local/mosquitto/mosquitto.conf.tmpl, docs/reliability.md):
    # the broker saves its state every this many seconds, or, with autosave_on_changes, once this
    # many messages, sessions or subscriptions changed.
    mqtt_autosave_interval: int = Field(default=1, ge=1)
    mqtt_autosave_on_changes: bool = False

    kafka_heap_mb: int = Field(default=512, ge=128)
    # 1: one KRaft node, broker and controller (the default). 3: a KRaft cluster of three such
    # nodes, topics at replication factor 3 and min.insync.replicas 2 (docs/scaling.md). Node 1
    # listens on kafka_port and kafka_controller_port; nodes 2 and 3 on kafka_cluster_ports:
    # client port and controller port of node 2, then of node 3 (JSON, e.g. [14092,14093,14094,
    # 14095]). Each node of a cluster has kafka_cluster_heap_mb.
    kafka_brokers: Literal[1, 3] = 1
    kafka_cluster_ports: tuple[int, ...] = ()
    kafka_cluster_heap_mb: int = Field(default=256, ge=128)
    kafka_partitions: int = Field(default=DEFAULT_PARTITIONS, ge=1)
    kafka_libs_dir: Path = Field(default_factory=_default_kafka_libs_dir)
    # Lets CI (or a cold-start measurement) use its own Maven repository instead of ~/.m2.
    maven_repo_local: Path | None = None

    mosquitto_bin: Path = Path("/usr/sbin/mosquitto")
    mosquitto_passwd_bin: Path = Path("/usr/bin/mosquitto_passwd")
    # Debian's mosquitto package ships it; it binds each device account to its own client id.
    mosquitto_dynsec_plugin: Path = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
    pg_bin_dir: Path = Path("/usr/lib/postgresql/15/bin")
    java_bin: str = "java"
    mvn_bin: str = "mvn"

    mqtt_start_timeout_s: float = Field(default=15.0, gt=0)
    kafka_start_timeout_s: float = Field(default=60.0, gt=0)
    pg_start_timeout_s: float = Field(default=30.0, gt=0)
    smtp_start_timeout_s: float = Field(default=15.0, gt=0)
    # Maven may fetch ~95 jars on a cold cache; slow links need minutes, not seconds.
    kafka_download_timeout_s: float = Field(default=900.0, gt=0)
    stop_timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("data_dir", "kafka_libs_dir", "repo_root", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Resolved once, against the cwd of whoever built the settings, so child processes and
        # pid files never depend on their own working directory.
        return value.expanduser().resolve()

    @field_validator("maven_repo_local", mode="after")
    @classmethod
    def _absolute_optional(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().resolve()

    @model_validator(mode="after")
    def _derive_tls_port(self) -> StackSettings:
        if self.mqtt_tls_port == 0:
            if self.mqtt_port == 65535:
                raise ValueError("mqtt_port is 65535: set VIGIL_STACK_MQTT_TLS_PORT explicitly")
            self.mqtt_tls_port = self.mqtt_port + 1
        return self

    @model_validator(mode="after")
    def _cluster_ports(self) -> StackSettings:
        wanted = 2 * (self.kafka_brokers - 1)
        if self.kafka_brokers > 1 and len(self.kafka_cluster_ports) != wanted:
            raise ValueError(
                f"{self.kafka_brokers} Kafka brokers need VIGIL_STACK_KAFKA_CLUSTER_PORTS with "
                f"{wanted} ports (client and controller port of each node after the first), "
                f"got {list(self.kafka_cluster_ports)}"
            )
        return self

    @model_validator(mode="after")
    def _distinct_ports(self) -> StackSettings:
        ports = [
            self.mqtt_port,
            self.mqtt_tls_port,
            self.kafka_port,
            self.kafka_controller_port,
            self.pg_port,
            self.smtp_port,
        ]
        if self.kafka_brokers > 1:
            ports.extend(self.kafka_cluster_ports)
        if len(set(ports)) != len(ports):
            raise ValueError(f"the stack's ports must all differ, got {ports}")
        return self

    # Layout of data_dir, in one place.

    @property
    def pids_dir(self) -> Path:
        return self.data_dir / "pids"

    @property
    def secrets_file(self) -> Path:
        return self.data_dir / "secrets.json"

    @property
    def env_file(self) -> Path:
        return self.data_dir / "stack.env"

    @property
    def marker_file(self) -> Path:
        return self.data_dir / ".vigil-stack"

    @property
    def mosquitto_dir(self) -> Path:
        return self.data_dir / "mosquitto"

    @property
    def tls_dir(self) -> Path:
        # The test CA lives outside mosquitto_dir: that tree is handed to the broker's user, and
        # the CA's private key is no business of the broker's.
        return self.data_dir / "tls"

    @property
    def kafka_dir(self) -> Path:
        return self.data_dir / "kafka"

    @property
    def kafka_nodes(self) -> list[tuple[int, int, int]]:
        """(node id, client port, controller port) of each Kafka node, node 1 first."""
        nodes = [(1, self.kafka_port, self.kafka_controller_port)]
        if self.kafka_brokers > 1:
            extra = self.kafka_cluster_ports
            nodes += [(2 + i, extra[2 * i], extra[2 * i + 1]) for i in range(len(extra) // 2)]
        return nodes

    @property
    def postgres_dir(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    @property
    def deploy_dir(self) -> Path:
        return self.repo_root / "deploy" / "local"
