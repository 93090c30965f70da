"""Process plumbing of the local stack: detached children, pid files, readiness waits, file modes.

Each component runs as a detached process in its own session with its output appended to its log
file, and is remembered by a pid file under ``data_dir/pids``. A pid file alone is not trusted:
a pid is only "ours" while ``/proc/<pid>/cmdline`` still names this stack's data directory, which
guards against stale pid files and against pids the kernel has since reused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import signal
import socket
import string
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 30
_POLL_S = 0.1

# Children started by this interpreter. Holding the Popen objects lets us reap a child that
# exits (so it does not linger as a zombie that still "exists") and keeps Popen's destructor from
# warning about a child it believes it leaked; the children are meant to outlive us.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class StackError(RuntimeError):
    """A component of the local stack could not be started, reached or stopped."""


def is_root() -> bool:
    return os.geteuid() == 0


def utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# Files.


def write_file(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    """Write ``path`` atomically (temp file + rename) with ``mode`` set before any content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = text.encode() if isinstance(text, str) else text
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask; secrets must not be.
        with os.fdopen(fd, "wb") as handle:
            fd = -1
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def render_template(template: Path, values: Mapping[str, object]) -> str:
    """``template`` with ``${name}`` placeholders filled; a missing value is an error, not blank."""
    try:
        return string.Template(template.read_text()).substitute(
            {key: str(value) for key, value in values.items()}
        )
    except KeyError as exc:
        raise StackError(f"template {template} needs a value for {exc.args[0]!r}") from exc


def tail(path: Path, lines: int = LOG_TAIL_LINES, since: int = 0) -> str:
    """The last ``lines`` lines of ``path`` written after byte offset ``since``."""
    try:
        with path.open("rb") as handle:
            handle.seek(since)
            data = handle.read()
    except FileNotFoundError:
        return f"(no log at {path})"
    text = data.decode(errors="replace").rstrip("\n")
    if not text:
        return f"(log {path} is empty)"
    return "\n".join(text.splitlines()[-lines:])


def chown_tree(path: Path, user: str) -> None:
    """Give ``path`` and everything under it to ``user`` (only meaningful when we are root)."""
    if not is_root():
        return
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def make_traversable(path: Path) -> None:
    """Let other users pass through every ancestor of ``path`` (execute bit only, never read).

    As root, PostgreSQL and Mosquitto drop to their own users, which must reach their directories
    inside data_dir even when a parent (say a 0700 temp dir) is closed to others.
    """
    if not is_root():
        return
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & 0o001:
            log.info("adding o+x to %s so service users can reach the stack's data", directory)
            os.chmod(directory, (mode & 0o7777) | 0o001)


# Ports.


def port_accepts(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def ensure_port_free(port: int, what: str) -> None:
    """Fail early, and clearly, when something else already owns a port we are about to bind."""
    if port_accepts(port):
        raise StackError(
            f"cannot start {what}: 127.0.0.1:{port} is already in use by another process "
            "(another stack or a system service?); choose other VIGIL_STACK_*_PORT values"
        )


# Processes.


def _identity(user: str | None) -> tuple[int | None, int | None, list[int] | None]:
    """uid, gid and (no) supplementary groups to run as ``user``; no change unless we are root."""
    if user is None or not is_root():
        return None, None, None
    entry = pwd.getpwnam(user)
    # An empty group list drops root's supplementary groups, which setuid alone would keep.
    return entry.pw_uid, entry.pw_gid, []


@dataclass(frozen=True, slots=True)
class Component:
    """One detached process of the stack and how we recognise it."""

    name: str
    pid_file: Path
    log_file: Path
    # A string that must appear in the process's command line for a pid to be ours; the stack
    # passes a path inside its own data_dir, which also tells two stacks' processes apart.
    marker: str
    port: int
    stop_signal: signal.Signals = signal.SIGTERM


def _cmdline(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name, which may itself contain spaces.
    return stat.rpartition(")")[2].split()[0] == "Z"


def pid_alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def running_pid(component: Component) -> int | None:
    """The pid of ``component`` when it is running, else None (stale pid files count as not)."""
    pid = read_pid(component.pid_file)
    if pid is None or not pid_alive(pid):
        return None
    cmdline = _cmdline(pid)
    if cmdline is not None and component.marker not in cmdline:
        return None  # the pid was recycled for an unrelated process
    return pid


def spawn(
    component: Component,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
) -> tuple[int, int]:
    """Start ``argv`` detached; returns its pid and the log offset where its output begins."""
    component.log_file.parent.mkdir(parents=True, exist_ok=True)
    component.pid_file.parent.mkdir(parents=True, exist_ok=True)
    with component.log_file.open("ab") as log_handle:
        offset = log_handle.tell()
        log_handle.write(f"=== {utc_stamp()} vigil stack starts {component.name}\n".encode())
        log_handle.flush()
        uid, gid, groups = _identity(user)
        try:
            child = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                # Own session: a Ctrl-C in the terminal that ran `up` must not stop the stack.
                start_new_session=True,
                close_fds=True,
                user=uid,
                group=gid,
                extra_groups=groups,
            )
        except OSError as exc:
            raise StackError(f"cannot start {component.name} ({argv[0]}): {exc}") from exc
    _CHILDREN[child.pid] = child
    write_file(component.pid_file, f"{child.pid}\n")
    log.info("started %s (pid %d), log %s", component.name, child.pid, component.log_file)
    return child.pid, offset


def wait_until(
    component: Component,
    ready: Callable[[], bool],
    *,
    timeout_s: float,
    what: str,
    pid: int | None = None,
    log_offset: int = 0,
) -> None:
    """Poll ``ready`` until true; raise with the log tail on timeout or when ``pid`` dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        if ready():
            return
        if pid is not None and not pid_alive(pid):
            raise StackError(
                f"{component.name} exited while waiting for {what}; "
                f"last lines of {component.log_file}:\n"
                f"{tail(component.log_file, since=log_offset)}"
            )
        if time.monotonic() >= deadline:
            raise StackError(
                f"{component.name}: {what} not reached within {timeout_s:.0f} s; "
                f"last lines of {component.log_file}:\n"
                f"{tail(component.log_file, since=log_offset)}"
            )
        time.sleep(_POLL_S)


def signal_component(component: Component) -> int | None:
    """Send the component its stop signal; returns the pid signalled, if it was running."""
    pid = running_pid(component)
    if pid is None:
        with contextlib.suppress(FileNotFoundError):
            component.pid_file.unlink()
        return None
    log.info("stopping %s (pid %d)", component.name, pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, component.stop_signal)
    return pid


def await_exit(component: Component, pid: int, timeout_s: float) -> None:
    """Wait for ``pid`` to exit; past ``timeout_s`` kill its whole process group."""
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    if pid_alive(pid):
        log.warning(
            "%s (pid %d) ignored its stop signal for %.0f s; killing it",
            component.name,
            pid,
            timeout_s,
        )
        # The session (= process group) started with the component holds its helpers too,
        # e.g. PostgreSQL's backends, which must not outlive a killed postmaster.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        kill_deadline = time.monotonic() + 5.0
        while pid_alive(pid) and time.monotonic() < kill_deadline:
            time.sleep(_POLL_S)
        if pid_alive(pid):
            raise StackError(f"{component.name} (pid {pid}) survived SIGKILL")
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        child.wait(timeout=1.0)
    with contextlib.suppress(FileNotFoundError):
        component.pid_file.unlink()


def run_checked(
    argv: Sequence[str],
    *,
    what: str,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
    input_text: str | None = None,
) -> str:
    """Run a short setup command to completion; its output goes into the error when it fails."""
    uid, gid, groups = _identity(user)
    try:
        result = subprocess.run(
            list(argv),
            input=input_text,
            capture_output=True,
            text=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            timeout=timeout_s,
            check=False,
            user=uid,
            group=gid,
            extra_groups=groups,
        )
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"{what} did not finish within {timeout_s:.0f} s") from exc
    except OSError as exc:
        raise StackError(f"{what}: cannot run {argv[0]}: {exc}") from exc
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).strip().splitlines()[-LOG_TAIL_LINES:])
        raise StackError(f"{what} failed (exit {result.returncode}):\n{output}")
    stdout: str = result.stdout
    return stdout
