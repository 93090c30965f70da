"""``Instant``: a time in POSIX seconds in rule state, where ``-inf`` means "never".

Rule state compares times on every event, so "not yet" is ``-inf`` (smaller than any time)
rather than None. JSON has no infinity: a state record writes ``-inf`` as ``null`` (as
``msgspec`` and ``orjson`` both encode it), and a state record with an ``Instant`` field reads a
``null`` back as ``-inf`` in its ``__post_init__`` (``never_if_none``), which ``msgspec`` runs
after decoding too. To the type checker an ``Instant`` is a ``float``; to ``msgspec`` it is
``float | None``, so that the ``null`` decodes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

NEVER = float("-inf")

if TYPE_CHECKING:
    Instant = float
else:
    Instant = float | None


def never_if_none(value: float | None) -> float:
    return NEVER if value is None else value
