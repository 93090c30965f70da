"""LoginThrottle: a sliding-window limit on login attempts per key (username, client address).

Pure: the caller passes the time. Guessing passwords costs an attacker a wait, not the team a
locked account: only failures count, and a success clears the key.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class LoginThrottle:
    max_failures: int = 5
    window_s: float = 60.0
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again; 0 when it may try now."""
        recent = self._recent(key, now)
        if len(recent) < self.max_failures:
            return 0.0
        return max(0.0, recent[0] + self.window_s - now)

    def failed(self, key: str, now: float) -> None:
        self._recent(key, now).append(now)

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)

    def _recent(self, key: str, now: float) -> deque[float]:
        recent = self._failures.setdefault(key, deque())
        while recent and recent[0] <= now - self.window_s:
            recent.popleft()
        return recent
