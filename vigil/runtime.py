"""Process plumbing shared by the service entry points: logging and graceful shutdown.

Logs are one JSON object per line with an event name and identifiers only; payload values (a
temperature, a name) are PHI and are never logged.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka logs every rebalance and reconnect at INFO; keep its warnings only.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def log_fields(**fields: Any) -> dict[str, Any]:
    """``extra=`` for a log call: ``log.info("page_sent", extra=log_fields(page_id=...))``."""
    return {"fields": fields}


def run_until_signalled(service: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run ``service(stop)`` until SIGINT or SIGTERM sets ``stop``; returns an exit code."""

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await service(stop)

    asyncio.run(_main())
    return 0


def freeze_start_up_heap() -> None:
    """Take what the process holds after start-up (modules, classes, schemas, settings) out of
    the garbage collector's scans: collect once, then ``gc.freeze()``. A full collection
    otherwise walks all of it while the event loop waits (13-49 ms each in ``bench/notify.py``'s
    process, which runs notify's service). What is allocated afterwards is collected as before."""
    gc.collect()
    gc.freeze()


def utcnow() -> datetime:
    """The wall clock, timezone-aware. Only adapters call it; domain code gets time passed in."""
    return datetime.now(UTC)
