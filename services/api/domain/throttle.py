"""Login throttles: sliding-window limits on failed logins per key (username and address).

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


@dataclass
class LoginThrottles:
    """The three limits a login passes, each a sliding window of failures:

    - per username *and* address (``max_failures``): someone guessing one account from one
      place waits, while the account's owner at another workstation still logs in (a limit per
      username alone let five wrong passwords from anywhere lock the real user out);
    - per username from every address (ten times as many): guessing one account from many
      places is bounded too;
    - per address over every username (ten times as many): one place trying many accounts;
      a ward's workstations often share one address and must not lock each other out.

    A success clears only its own username-and-address key.
    """

    max_failures: int = 5
    window_s: float = 60.0
    pair: LoginThrottle = field(init=False)
    username: LoginThrottle = field(init=False)
    address: LoginThrottle = field(init=False)

    def __post_init__(self) -> None:
        self.pair = LoginThrottle(self.max_failures, self.window_s)
        self.username = LoginThrottle(self.max_failures * 10, self.window_s)
        self.address = LoginThrottle(self.max_failures * 10, self.window_s)

    def _keys(self, username: str, address: str) -> tuple[tuple[LoginThrottle, str], ...]:
        name = username.lower()
        return (
            (self.pair, f"{name}@{address}"),
            (self.username, name),
            (self.address, address),
        )

    def retry_after(self, username: str, address: str, now: float) -> float:
        return max(t.retry_after(key, now) for t, key in self._keys(username, address))

    def failed(self, username: str, address: str, now: float) -> None:
        for throttle, key in self._keys(username, address):
            throttle.failed(key, now)

    def succeeded(self, username: str, address: str) -> None:
        throttle, key = self._keys(username, address)[0]
        throttle.succeeded(key)
