"""The stack's Kafka: a single KRaft node (broker + controller) under ``data_dir/kafka``, or with
``VIGIL_STACK_KAFKA_BROKERS=3`` a cluster of three such nodes (node 1 there, nodes 2 and 3 under
``data_dir/kafka/node-N``).

Owns fetching the broker jars with Maven (once per machine, into a cache outside data_dir),
rendering ``deploy/local/kafka/server.properties.tmpl``, formatting the storage on first start,
running the JVM, and creating the topics of :mod:`vigil_tools.stack.topics` with their partition
counts and retention.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import functools
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from vigil_tools.stack.process import (
    Component,
    StackError,
    ensure_port_free,
    port_accepts,
    render_template,
    run_checked,
    running_pid,
    spawn,
    tail,
    wait_until,
    write_file,
)
from vigil_tools.stack.settings import KAFKA_VERSION, StackSettings
from vigil_tools.stack.topics import TopicSpec, topic_specs

log = logging.getLogger(__name__)

NAME: Final = "kafka"
_COMPLETE_MARKER: Final = ".complete"
_TOOL_HEAP_MB: Final = 256


_CLUSTER_NODES: Final = (2, 3)  # the nodes a cluster has beside node 1


def node_dir(settings: StackSettings, node: int = 1) -> Path:
    return settings.kafka_dir if node == 1 else settings.kafka_dir / f"node-{node}"


def conf_file(settings: StackSettings, node: int = 1) -> Path:
    return node_dir(settings, node) / "server.properties"


def log_dir(settings: StackSettings, node: int = 1) -> Path:
    return node_dir(settings, node) / "data"


def log4j_file(settings: StackSettings) -> Path:
    return settings.kafka_dir / "log4j2.yaml"


def cluster_id_file(settings: StackSettings) -> Path:
    return settings.kafka_dir / "cluster-id"


def _ports(settings: StackSettings, node: int) -> tuple[int, int]:
    for node_id, port, controller_port in settings.kafka_nodes:
        if node_id == node:
            return port, controller_port
    return 0, 0  # a node this configuration does not have (down still stops it)


def component(settings: StackSettings, node: int = 1) -> Component:
    name = NAME if node == 1 else f"{NAME}-{node}"
    return Component(
        name=name,
        pid_file=settings.pids_dir / f"{name}.pid",
        log_file=node_dir(settings, node) / "kafka.log",
        marker=str(conf_file(settings, node)),
        port=_ports(settings, node)[0],
    )


def cluster_components(settings: StackSettings) -> list[Component]:
    """Nodes 2 and 3, whether this configuration has them or not (``down`` stops them anyway, so
    a cluster is not left running by a ``down`` without the cluster's variables)."""
    return [component(settings, node) for node in _CLUSTER_NODES]


def bootstrap_servers(settings: StackSettings) -> str:
    """Every node's client listener, comma-separated (one node down, clients still bootstrap)."""
    return ",".join(f"127.0.0.1:{port}" for _, port, _ in settings.kafka_nodes)


def render_server_properties(settings: StackSettings, node: int = 1) -> str:
    """The broker configuration of ``node`` for ``settings`` (pure: reads only the template)."""
    if settings.kafka_brokers == 1:
        return render_template(
            settings.deploy_dir / "kafka" / "server.properties.tmpl",
            {
                "kafka_port": settings.kafka_port,
                "controller_port": settings.kafka_controller_port,
                "log_dirs": log_dir(settings),
            },
        )
    port, controller_port = _ports(settings, node)
    return render_template(
        settings.deploy_dir / "kafka" / "cluster.properties.tmpl",
        {
            "node_id": node,
            "voters": ",".join(
                f"{node_id}@127.0.0.1:{controller}"
                for node_id, _, controller in settings.kafka_nodes
            ),
            "kafka_port": port,
            "controller_port": controller_port,
            "log_dirs": log_dir(settings, node),
        },
    )


def java_argv(settings: StackSettings, main_class: str, *args: str, heap_mb: int) -> list[str]:
    return [
        settings.java_bin,
        f"-Xms{heap_mb}m",
        f"-Xmx{heap_mb}m",
        # The GC flags kafka-server-start.sh uses: short pauses matter more than throughput.
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j_file(settings)}",
        "-cp",
        # The JVM expands the trailing * itself; no shell is involved.
        f"{settings.kafka_libs_dir}/*",
        main_class,
        *args,
    ]


# Jars.


def jars_present(settings: StackSettings) -> bool:
    return (settings.kafka_libs_dir / _COMPLETE_MARKER).exists()


@contextlib.contextmanager
def _download_lock(settings: StackSettings) -> Iterator[None]:
    # Two stacks started at once on a cold machine must not both write the shared cache.
    parent = settings.kafka_libs_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    with (parent / ".download.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_jars(settings: StackSettings) -> None:
    """Fetch the broker's jars into ``kafka_libs_dir`` unless a complete copy is there."""
    if jars_present(settings):
        return
    with _download_lock(settings):
        if jars_present(settings):
            return
        target = settings.kafka_libs_dir
        staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        argv = [
            settings.mvn_bin,
            "-q",
            "-B",
            "-f",
            str(settings.deploy_dir / "kafka" / "pom.xml"),
            f"-Dkafka.version={KAFKA_VERSION}",
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
        ]
        if settings.maven_repo_local is not None:
            argv.append(f"-Dmaven.repo.local={settings.maven_repo_local}")
        log.info("fetching Kafka %s jars with Maven into %s", KAFKA_VERSION, target)
        started = time.monotonic()
        try:
            run_checked(
                argv, what="fetching the Kafka jars", timeout_s=settings.kafka_download_timeout_s
            )
            if not any(staging.glob("kafka_2.13-*.jar")):
                raise StackError(f"Maven finished but no kafka_2.13 jar is in {staging}")
            (staging / _COMPLETE_MARKER).write_text(f"{KAFKA_VERSION}\n")
            # Staged then renamed so an interrupted download is never mistaken for a cache.
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info(
            "fetched %d jars in %.1f s",
            sum(1 for _ in target.glob("*.jar")),
            time.monotonic() - started,
        )


# Storage.


def new_cluster_id() -> str:
    """A cluster id in Kafka's own format (``Uuid.toString``: unpadded URL-safe base64)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # Kafka's Uuid.randomUuid() rejects ids starting with '-' (they read as CLI flags).
        if not text.startswith("-"):
            return text


def _format_cluster_node(settings: StackSettings, node: int) -> None:
    if (log_dir(settings, node) / "meta.properties").exists():
        return
    log_dir(settings, node).mkdir(parents=True, exist_ok=True)
    # One cluster id for the three nodes, chosen by whichever is formatted first.
    if not cluster_id_file(settings).exists():
        write_file(cluster_id_file(settings), new_cluster_id() + "\n")
    cluster_id = cluster_id_file(settings).read_text().strip()
    log.info("formatting Kafka node %d storage in %s", node, log_dir(settings, node))
    run_checked(
        java_argv(
            settings,
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            cluster_id,
            "--config",
            str(conf_file(settings, node)),
            heap_mb=_TOOL_HEAP_MB,
        ),
        what=f"formatting Kafka node {node}'s storage",
        timeout_s=120.0,
    )


def _format_storage(settings: StackSettings) -> None:
    if (log_dir(settings) / "meta.properties").exists():
        return
    log_dir(settings).mkdir(parents=True, exist_ok=True)
    cluster_id = new_cluster_id()
    log.info("formatting Kafka storage in %s (cluster id %s)", log_dir(settings), cluster_id)
    run_checked(
        java_argv(
            settings,
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            cluster_id,
            "--config",
            str(conf_file(settings)),
            "--standalone",
            heap_mb=_TOOL_HEAP_MB,
        ),
        what="formatting the Kafka storage",
        timeout_s=120.0,
    )


# Topics.


def _admin(settings: StackSettings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers(settings),
        client_id="vigil-stack",
        request_timeout_ms=10_000,
    )


def _config_entries(resource: dict[str, Any]) -> dict[str, str]:
    entries: dict[str, str] = {}
    for entry in resource.get("config_entries", []):
        # The field is "config_names" in DescribeConfigs v0 and "config_name" later.
        name = entry.get("config_name", entry.get("config_names"))
        entries[str(name)] = str(entry.get("config_value"))
    return entries


async def _describe(
    admin: AIOKafkaAdminClient, names: list[str]
) -> tuple[dict[str, int], dict[str, dict[str, str]]]:
    partitions: dict[str, int] = {}
    for topic in await admin.describe_topics(names):
        if topic["error_code"] == 0:
            partitions[topic["topic"]] = len(topic["partitions"])
    configs: dict[str, dict[str, str]] = {}
    if partitions:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in partitions]
        )
        for response in responses:
            for resource in response.to_object()["resources"]:
                configs[resource["resource_name"]] = _config_entries(resource)
    return partitions, configs


async def _ensure_topics_once(admin: AIOKafkaAdminClient, specs: tuple[TopicSpec, ...]) -> None:
    names = [spec.name for spec in specs]
    existing, configs = await _describe(admin, names)
    missing = [spec for spec in specs if spec.name not in existing]
    if missing:
        response = await admin.create_topics(
            [
                NewTopic(
                    spec.name,
                    spec.partitions,
                    spec.replication_factor,
                    topic_configs=spec.configs(),
                )
                for spec in missing
            ]
        )
        for result in response.to_object()["topic_errors"]:
            error = for_code(result["error_code"])
            if result["error_code"] != 0 and error is not TopicAlreadyExistsError:
                raise StackError(
                    f"creating Kafka topic {result['topic']} failed: {error.__name__} "
                    f"{result.get('error_message') or ''}".rstrip()
                )
        log.info("created Kafka topics %s", ", ".join(spec.name for spec in missing))
    for spec in specs:
        if spec.name not in existing:
            continue
        have = existing[spec.name]
        if have < spec.partitions:
            log.info("growing %s from %d to %d partitions", spec.name, have, spec.partitions)
            await admin.create_partitions({spec.name: NewPartitions(spec.partitions)})
        elif have > spec.partitions:
            # Kafka cannot shrink a topic; say so rather than fail a developer's `up`.
            log.warning(
                "%s has %d partitions, more than the %d configured; `down --purge` to rebuild",
                spec.name,
                have,
                spec.partitions,
            )
        wanted = spec.configs()
        current = configs.get(spec.name, {})
        if any(current.get(key) != value for key, value in wanted.items()):
            log.info("setting %s on %s", wanted, spec.name)
            # AlterConfigs replaces the topic's dynamic configs as a whole; the stack owns these
            # topics and sets exactly this set, so nothing else is lost.
            responses = await admin.alter_configs(
                [ConfigResource(ConfigResourceType.TOPIC, spec.name, configs=wanted)]
            )
            for response in responses:
                for resource in response.to_object()["resources"]:
                    if resource["error_code"] != 0:
                        raise StackError(
                            f"setting {wanted} on {spec.name} failed: "
                            f"{for_code(resource['error_code']).__name__} "
                            f"{resource.get('error_message') or ''}".rstrip()
                        )


async def ensure_topics(settings: StackSettings, timeout_s: float) -> None:
    """Create or fix the stack's topics; retried until the controller accepts them."""
    specs = topic_specs(settings.kafka_partitions, replication_factor=settings.kafka_brokers)
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        admin = _admin(settings)
        try:
            await admin.start()
            await _ensure_topics_once(admin, specs)
            existing, _ = await _describe(admin, [spec.name for spec in specs])
            if all(spec.name in existing for spec in specs):
                return
        except (KafkaError, OSError, StackError) as exc:
            # Right after start the broker can accept connections before it has a leader for
            # the metadata log; those errors are transient.
            last_error = exc
        finally:
            await admin.close()
        await asyncio.sleep(0.5)
    raise StackError(f"Kafka topics not ready within {timeout_s:.0f} s: {last_error!r}")


# Life cycle.


def _start_cluster(settings: StackSettings) -> None:
    """Start each node of the cluster that is not running, all before waiting on any: a KRaft
    controller quorum elects a leader only once a majority of its voters is up."""
    ensure_jars(settings)
    deadline = time.monotonic() + settings.kafka_start_timeout_s
    settings.kafka_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(settings.deploy_dir / "kafka" / "log4j2.yaml", log4j_file(settings))
    started: list[tuple[Component, int, int, int]] = []
    for node, port, controller_port in settings.kafka_nodes:
        comp = component(settings, node)
        if running_pid(comp) is not None:
            continue
        ensure_port_free(port, f"Kafka node {node}")
        ensure_port_free(controller_port, f"the Kafka controller of node {node}")
        node_dir(settings, node).mkdir(parents=True, exist_ok=True)
        write_file(conf_file(settings, node), render_server_properties(settings, node))
        _format_cluster_node(settings, node)
        pid, offset = spawn(
            comp,
            java_argv(
                settings,
                "kafka.Kafka",
                str(conf_file(settings, node)),
                heap_mb=settings.kafka_cluster_heap_mb,
            ),
            cwd=node_dir(settings, node),
        )
        started.append((comp, port, pid, offset))
    for comp, port, pid, offset in started:
        wait_until(
            comp,
            functools.partial(port_accepts, port),
            timeout_s=max(deadline - time.monotonic(), 1.0),
            what=f"Kafka listener on 127.0.0.1:{port}",
            pid=pid,
            log_offset=offset,
        )
    try:
        asyncio.run(ensure_topics(settings, timeout_s=max(deadline - time.monotonic(), 10.0)))
    except StackError as exc:
        comp = component(settings)
        raise StackError(f"{exc}; last lines of {comp.log_file}:\n{tail(comp.log_file)}") from exc


def start(settings: StackSettings) -> None:
    """Start the broker unless it runs; block until it accepts clients and the topics exist."""
    if settings.kafka_brokers > 1:
        _start_cluster(settings)
        return
    comp = component(settings)
    deadline = time.monotonic() + settings.kafka_start_timeout_s
    if running_pid(comp) is None:
        ensure_port_free(settings.kafka_port, "Kafka")
        ensure_port_free(settings.kafka_controller_port, "the Kafka controller")
        ensure_jars(settings)
        # The start-up budget begins after the download, whose length depends on the network.
        deadline = time.monotonic() + settings.kafka_start_timeout_s
        settings.kafka_dir.mkdir(parents=True, exist_ok=True)
        write_file(conf_file(settings), render_server_properties(settings))
        shutil.copyfile(settings.deploy_dir / "kafka" / "log4j2.yaml", log4j_file(settings))
        _format_storage(settings)
        pid, offset = spawn(
            comp,
            java_argv(
                settings, "kafka.Kafka", str(conf_file(settings)), heap_mb=settings.kafka_heap_mb
            ),
            cwd=settings.kafka_dir,
        )
        wait_until(
            comp,
            lambda: port_accepts(settings.kafka_port),
            timeout_s=max(deadline - time.monotonic(), 1.0),
            what=f"Kafka listener on 127.0.0.1:{settings.kafka_port}",
            pid=pid,
            log_offset=offset,
        )
    try:
        asyncio.run(ensure_topics(settings, timeout_s=max(deadline - time.monotonic(), 10.0)))
    except StackError as exc:
        raise StackError(f"{exc}; last lines of {comp.log_file}:\n{tail(comp.log_file)}") from exc
