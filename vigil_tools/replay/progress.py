"""A progress bar for long replays, on stderr, only when someone is watching.

It is drawn when stderr is a terminal or when asked for (``--progress``), and redrawn at most
ten times a second, so it costs nothing measurable per event. The wall clock is read here only
to pace redraws; nothing it reads reaches a replay's decisions.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    def __init__(
        self,
        total: int | None,
        *,
        label: str = "replay",
        stream: TextIO | None = None,
        enabled: bool | None = None,
        width: int = 30,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = self._stream.isatty() if enabled is None else enabled
        self.total = total
        self.done = 0
        self._label = label
        self._width = width
        self._started = time.monotonic()
        self._drawn_at = 0.0

    def advance(self, count: int) -> None:
        self.done += count
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._drawn_at >= 0.1:
            self._drawn_at = now
            self._draw(now)

    def render(self, now: float) -> str:
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            filled = int(fraction * self._width)
            bar = "#" * filled + "-" * (self._width - filled)
            left = (self.total - self.done) / rate if rate > 0 else 0.0
            return (
                f"{self._label} [{bar}] {fraction * 100:5.1f}% "
                f"{self.done}/{self.total} events {rate:,.0f}/s eta {left:,.0f}s"
            )
        return f"{self._label} {self.done} events {rate:,.0f}/s"

    def _draw(self, now: float) -> None:
        self._stream.write("\r" + self.render(now) + "\x1b[K")
        self._stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()
