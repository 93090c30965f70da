"""The local stack as a whole: bring every component up or down, report on them, export their env.

Components start concurrently (Kafka's JVM dominates a cold start, so the others finish while it
boots); each one's ``start`` is idempotent, so ``up`` on a running stack only re-checks topics
and migrations and starts nothing.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from vigil_tools.stack import kafka, mail, mosquitto, postgres
from vigil_tools.stack.credentials import (
    INGEST_MQTT_USER,
    SIM_MQTT_USER,
    ensure_secrets,
    load_secrets,
)
from vigil_tools.stack.process import (
    Component,
    StackError,
    await_exit,
    make_traversable,
    running_pid,
    signal_component,
    write_file,
)
from vigil_tools.stack.settings import StackSettings
from vigil_tools.stack.tls import ca_cert_file

log = logging.getLogger(__name__)

_MARKER_TEXT: Final = "This directory holds a Vigil local stack; `down --purge` deletes it.\n"


def components(settings: StackSettings) -> list[Component]:
    listed = [
        mosquitto.component(settings),
        kafka.component(settings),
        postgres.component(settings),
        mail.component(settings),
    ]
    if settings.kafka_brokers > 1:
        listed[2:2] = kafka.cluster_components(settings)
    return listed


def _starters() -> dict[str, Callable[[StackSettings], None]]:
    return {
        mosquitto.NAME: mosquitto.start,
        kafka.NAME: kafka.start,
        postgres.NAME: postgres.start,
        mail.NAME: mail.start,
    }


def _prepare_data_dir(settings: StackSettings) -> None:
    data_dir = settings.data_dir
    if data_dir.exists() and any(data_dir.iterdir()) and not settings.marker_file.exists():
        raise StackError(
            f"{data_dir} exists, is not empty and is not a Vigil stack directory; "
            "refusing to use it (set VIGIL_STACK_DATA_DIR to a new or stack directory)"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    if not settings.marker_file.exists():
        write_file(settings.marker_file, _MARKER_TEXT)
    settings.pids_dir.mkdir(exist_ok=True)
    make_traversable(data_dir)


def up(settings: StackSettings) -> None:
    """Start whatever part of the stack is not running and block until all of it is ready.

    Ready means: the MQTT, Kafka, PostgreSQL and SMTP ports accept connections, the Kafka topics
    exist, and the PostgreSQL role, database and migrations are in place. Raises
    :class:`StackError` naming every component that failed, with the tail of its log.
    """
    _prepare_data_dir(settings)
    ensure_secrets(settings)  # once, before the components read it concurrently
    starters = _starters()
    failures: list[str] = []
    with ThreadPoolExecutor(max_workers=len(starters), thread_name_prefix="vigil-stack") as pool:
        futures = {name: pool.submit(start, settings) for name, start in starters.items()}
        for name, future in futures.items():
            try:
                future.result()
            except StackError as exc:
                failures.append(f"[{name}] {exc}")
            except Exception as exc:
                failures.append(f"[{name}] unexpected {type(exc).__name__}: {exc}")
    if failures:
        raise StackError("the local stack did not come up:\n" + "\n\n".join(failures))
    env = stack_env(settings)
    write_file(
        settings.env_file, "".join(f"{key}={value}\n" for key, value in env.items()), mode=0o600
    )
    log.info("local stack ready in %s (env in %s)", settings.data_dir, settings.env_file)


def down(settings: StackSettings, purge: bool = False) -> None:
    """Stop every component (stop signal, wait, then SIGKILL); ``purge`` deletes data_dir.

    Safe when nothing runs and when data_dir does not exist.
    """
    every = components(settings)
    if settings.kafka_brokers == 1:
        # A cluster's other nodes, should one run here: stopped too.
        every += kafka.cluster_components(settings)
    stopping = [(comp, pid) for comp in every if (pid := signal_component(comp))]
    # Signalled all at once above, then awaited: the components shut down in parallel.
    errors: list[str] = []
    for comp, pid in stopping:
        try:
            await_exit(comp, pid, settings.stop_timeout_s)
        except StackError as exc:
            errors.append(str(exc))
    if errors:
        raise StackError("; ".join(errors))
    if purge and settings.data_dir.exists():
        if not settings.marker_file.exists():
            raise StackError(
                f"refusing to delete {settings.data_dir}: it has no {settings.marker_file.name} "
                "marker, so it was not created by the stack"
            )
        shutil.rmtree(settings.data_dir)
        log.info("deleted %s", settings.data_dir)


def status(settings: StackSettings) -> dict[str, dict[str, Any]]:
    """Per component: ``running``, ``pid`` (None when stopped), ``port`` and ``log`` path."""
    report: dict[str, dict[str, Any]] = {}
    for comp in components(settings):
        pid = running_pid(comp)
        report[comp.name] = {
            "running": pid is not None,
            "pid": pid,
            "port": comp.port,
            "log": str(comp.log_file),
        }
    report[kafka.NAME]["controller_port"] = settings.kafka_controller_port
    report[mosquitto.NAME]["tls_port"] = settings.mqtt_tls_port
    return report


def stack_env(settings: StackSettings) -> dict[str, str]:
    """The environment services need to reach this stack (reads the generated secrets)."""
    secrets = load_secrets(settings)
    return {
        # The local stack is a developer's: its services may use the development secrets
        # (vigil.environment). Deployments leave this unset and run in production.
        "VIGIL_ENVIRONMENT": "development",
        "VIGIL_MQTT_HOST": "127.0.0.1",
        "VIGIL_MQTT_PORT": str(settings.mqtt_port),
        # The TLS listener and the CA that signed it. Not named VIGIL_INGEST_MQTT_TLS_CA_FILE on
        # purpose: that switches ingest to TLS, right only with VIGIL_MQTT_PORT on the TLS port.
        "VIGIL_MQTT_TLS_PORT": str(settings.mqtt_tls_port),
        "VIGIL_MQTT_TLS_CA_FILE": str(ca_cert_file(settings)),
        "VIGIL_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers(settings),
        "VIGIL_PG_DSN": postgres.app_dsn(settings, secrets.pg_vigil_password),
        "VIGIL_INGEST_MQTT_USERNAME": INGEST_MQTT_USER,
        "VIGIL_INGEST_MQTT_PASSWORD": secrets.mqtt_ingest_password,
        "VIGIL_SIM_MQTT_USERNAME": SIM_MQTT_USER,
        "VIGIL_SIM_MQTT_PASSWORD": secrets.mqtt_sim_password,
        "VIGIL_NOTIFY_SMTP_HOST": "127.0.0.1",
        "VIGIL_NOTIFY_SMTP_PORT": str(settings.smtp_port),
        "VIGIL_STACK_DATA_DIR": str(settings.data_dir),
    }
