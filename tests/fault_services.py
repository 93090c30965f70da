"""The fault suite's processes: Vigil services run as a deployment runs them, and the faults that
stop parts of the local stack.

``Service`` is one ``vigil <service>`` process with an ops port of its own, started and waited on
through its ``/readyz``. ``Supervisor`` restarts a service process that exits by itself, as the
compose deployment's ``restart: unless-stopped`` does, and counts each such exit; a process the
suite stops or kills on purpose is restarted by the suite, not by the supervisor.

``kill_kafka`` and ``stop_postgres`` / ``start_postgres`` act on the stack named by
:class:`vigil_tools.stack.StackSettings`: the Kafka JVM gets SIGKILL and is started again from the
same log directories; PostgreSQL gets its fast shutdown and is started again on the same cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tests.broker_faults import free_port
from tests.polling import eventually_sync
from vigil_tools.stack import kafka, postgres
from vigil_tools.stack.process import await_exit, port_accepts, running_pid, signal_component
from vigil_tools.stack.settings import StackSettings

ROOT = Path(__file__).resolve().parents[1]
# The environment variable that names each service's ops port (/readyz).
OPS_PORT_VARIABLE = {
    "ingest": "VIGIL_INGEST_METRICS_PORT",
    "rules": "VIGIL_RULES_OPS_PORT",
    "notify": "VIGIL_NOTIFY_OPS_PORT",
}


class Service:
    """One ``python -m vigil_tools.cli <name>`` process; its output goes to ``log``."""

    def __init__(self, name: str, label: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.label = label
        self.ops_port = free_port()
        self.env = {
            **os.environ,
            **env,
            OPS_PORT_VARIABLE[name]: str(self.ops_port),
            "PYTHONUNBUFFERED": "1",
        }
        self.log = log_dir / f"{label}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exits: list[int] = []  # return codes of exits the suite did not cause
        # Held while the suite stops or restarts the process, so the supervisor keeps out.
        self.lock = threading.Lock()

    def spawn(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vigil_tools.cli", self.name],
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ops_port}/readyz", timeout=1):
                return True
        except OSError:  # refused, or HTTP 503 (HTTPError is an OSError)
            return False

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        eventually_sync(
            self.ready, timeout_s=timeout_s, interval_s=0.02, what=f"{self.label}'s /readyz"
        )

    def start(self, timeout_s: float = 90.0) -> None:
        with self.lock:
            self.spawn()
        self.wait_ready(timeout_s)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the process with ``sig`` and reap it; a SIGTERM not obeyed in 60 s is a kill."""
        with self.lock:
            proc, self.proc = self.proc, None
            if proc is None or proc.poll() is not None:
                return
            proc.send_signal(sig)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def kill_and_restart(self) -> None:
        """SIGKILL, then a new process at once (as a supervisor would); waits for its /readyz."""
        self.stop(signal.SIGKILL)
        self.start()

    def supervise(self) -> None:
        """Restart the process if it exited by itself (called by ``Supervisor``)."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            if self.proc is None or self.proc.poll() is None:
                return
            self.exits.append(self.proc.returncode)
            self.spawn()
        finally:
            self.lock.release()


class Supervisor:
    """Restarts services that exit by themselves, one second after they do."""

    def __init__(self) -> None:
        self.services: list[Service] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="supervisor")

    def watch(self, service: Service) -> Service:
        self.services.append(service)
        return service

    def forget(self, service: Service) -> None:
        self.services.remove(service)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for service in list(self.services):
                service.supervise()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for service in self.services:
            service.stop()


def kill_kafka(settings: StackSettings) -> float:
    """SIGKILL the stack's Kafka and start it again; returns the seconds it was away."""
    comp = kafka.component(settings)
    pid = running_pid(comp)
    if pid is None:
        raise RuntimeError("the stack's Kafka is not running")
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    await_exit(comp, pid, timeout_s=30.0)
    # The JVM's main thread can be reaped before its other threads have let go of its sockets.
    ports = (settings.kafka_port, settings.kafka_controller_port)
    eventually_sync(
        lambda: not any(map(port_accepts, ports)),
        timeout_s=30.0,
        interval_s=0.02,
        what="Kafka's ports to close",
    )
    kafka.start(settings)  # blocks until it accepts clients and its topics exist
    return time.monotonic() - killed


def stop_postgres(settings: StackSettings) -> None:
    """PostgreSQL's fast shutdown (SIGINT: open transactions roll back, clients are cut off)."""
    comp = postgres.component(settings)
    pid = signal_component(comp)
    if pid is None:
        raise RuntimeError("the stack's PostgreSQL is not running")
    await_exit(comp, pid, timeout_s=60.0)
    eventually_sync(
        lambda: not port_accepts(settings.pg_port),
        timeout_s=30.0,
        interval_s=0.02,
        what="PostgreSQL's port to close",
    )


def start_postgres(settings: StackSettings) -> None:
    postgres.start(settings)  # blocks until it accepts logins and the migrations are in place
