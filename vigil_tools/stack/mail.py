"""The SMTP sink as a component of the stack: starts :mod:`vigil_tools.stack.mailsink` detached.

Kept apart from the sink program itself so that ``python -m vigil_tools.stack.mailsink`` does
not run a module the package has already imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Final

import vigil
from vigil_tools.stack.process import (
    Component,
    ensure_port_free,
    port_accepts,
    running_pid,
    spawn,
    wait_until,
)
from vigil_tools.stack.settings import StackSettings

NAME: Final = "mailsink"


def component(settings: StackSettings) -> Component:
    return Component(
        name=NAME,
        pid_file=settings.pids_dir / f"{NAME}.pid",
        log_file=settings.mail_dir.with_name("mailsink.log"),
        marker=str(settings.mail_dir),
        port=settings.smtp_port,
    )


def start(settings: StackSettings) -> None:
    """Start the sink unless it runs; block until it accepts SMTP connections."""
    comp = component(settings)
    if running_pid(comp) is not None:
        return
    ensure_port_free(settings.smtp_port, "the mail sink")
    settings.mail_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The child must import this checkout's vigil even when it is not installed.
    source_root = str(Path(vigil.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    pid, offset = spawn(
        comp,
        [
            sys.executable,
            "-m",
            "vigil_tools.stack.mailsink",
            "--host",
            "127.0.0.1",
            "--port",
            str(settings.smtp_port),
            "--dir",
            str(settings.mail_dir),
        ],
        env=env,
        cwd=settings.data_dir,
    )
    wait_until(
        comp,
        lambda: port_accepts(settings.smtp_port),
        timeout_s=settings.smtp_start_timeout_s,
        what=f"SMTP listener on 127.0.0.1:{settings.smtp_port}",
        pid=pid,
        log_offset=offset,
    )
