"""Waiting for a condition in a test: poll it until it holds, never sleep a fixed time.

``eventually`` (async) and ``eventually_sync`` call ``check`` every ``interval_s`` until it
returns something truthy, and return that; after ``timeout_s`` they fail the test with
``what`` (and ``detail()``, when given, for what the test saw meanwhile), by raising
``NotInTime``. ``check`` may be a plain function or a coroutine function. A check that is met
at once returns without sleeping.

``until_ready`` waits for a service started by the test to say it is ready on its ops port
(``/readyz``), instead of guessing how long it takes to subscribe or join its group.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from tests.ops_scrape import http_get

T = TypeVar("T")


class NotInTime(AssertionError, TimeoutError):
    """The condition a test waited for did not hold within its time: a failed assertion to
    pytest, a ``TimeoutError`` to the fault-suite scripts that go on after one."""


def _failure(what: str, timeout_s: float, detail: Callable[[], str] | None) -> NotInTime:
    message = f"not within {timeout_s:g} s: {what}"
    if detail is not None:
        message += f" ({detail()})"
    return NotInTime(message)


async def eventually(
    check: Callable[[], Awaitable[T] | T],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll ``check`` (sync or async) until its result is truthy; return that result."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if loop.time() >= deadline:
            raise _failure(what, timeout_s, detail)
        await asyncio.sleep(interval_s)


def eventually_sync(
    check: Callable[[], T],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> T:
    """``eventually`` for a blocking check in a test that has no event loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise _failure(what, timeout_s, detail)
        time.sleep(interval_s)


async def until_ready(
    port: int,
    *,
    what: str,
    timeout_s: float = 60,
    tasks: Sequence[asyncio.Task[Any]] = (),
) -> None:
    """Poll ``/readyz`` on 127.0.0.1:``port`` until it answers 200. A task in ``tasks`` (the
    services under test) that ended meanwhile raises its error as the test's."""

    async def ready() -> bool:
        for task in tasks:
            if task.done():
                task.result()
        try:
            status, _ = await http_get(port, "/readyz")
        except OSError:
            return False
        return status == 200

    await eventually(
        ready, timeout_s=timeout_s, interval_s=0.1, what=f"{what}'s /readyz to answer 200"
    )
