"""The retry schedule for a page the mail server did not accept: exponential, capped.

Pure and deterministic (no jitter): a page is one message to one server, so there is no herd to
spread, and a fixed schedule is what an auditor can check against the delivery log.
"""

from __future__ import annotations

# Past this many doublings the cap has long been reached; stopping here keeps float pow finite.
_MAX_DOUBLINGS = 64


def backoff_delay_s(
    attempt: int, *, base_s: float = 2.0, cap_s: float = 60.0, factor: float = 2.0
) -> float:
    """Seconds to wait after failed try number ``attempt`` (1-based) before the next one."""
    if attempt < 1:
        raise ValueError("attempt numbers start at 1")
    if base_s <= 0 or factor < 1 or cap_s < base_s:
        raise ValueError("need base_s > 0, factor >= 1 and cap_s >= base_s")
    exponent = min(attempt - 1, _MAX_DOUBLINGS)
    return float(min(cap_s, base_s * factor**exponent))
