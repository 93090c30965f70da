"""Times in UTC with one ``tzinfo`` object on each side of a comparison, so that it costs little.

Comparing or subtracting two aware datetimes whose ``tzinfo`` objects differ makes Python ask
each for its offset; pydantic's ``TzInfo`` answers through its Rust binding at about 1.4 µs a
call, and several times per reading (the clock checks, the binding lookup, the lag metric, the
database encoding). So ingest keeps each time in the ``tzinfo`` of what it meets:

- ``as_device_utc``: pydantic's UTC, the one device times carry, for the receive time (ingest
  time) compared with them, and serialised with them (pydantic writes its own faster too);
- ``as_utc``: the standard library's UTC, the one of the registry asyncpg reads and of the
  values asyncpg writes (it asks a value for its offset three times).

A conversion keeps the instant: a subtraction and an addition, each with one tzinfo on both
sides (about 0.4 µs).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pydantic import AwareDatetime, TypeAdapter

# The one tzinfo object pydantic gives a UTC device time ("...Z" or "+00:00").
_DEVICE_UTC = TypeAdapter(AwareDatetime).validate_python("1970-01-01T00:00:00Z").tzinfo
assert _DEVICE_UTC is not None and _DEVICE_UTC.utcoffset(None) == timedelta(0)
_DEVICE_EPOCH = datetime(1970, 1, 1, tzinfo=_DEVICE_UTC)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def as_utc(moment: datetime) -> datetime:
    """``moment`` (aware) with ``datetime.UTC`` as its tzinfo: the same instant."""
    tz = moment.tzinfo
    if tz is UTC:
        return moment
    if tz is _DEVICE_UTC:
        # One tzinfo on each side of the subtraction: no offset is asked for.
        return _EPOCH + (moment - _DEVICE_EPOCH)
    return moment.astimezone(UTC)


def as_device_utc(moment: datetime) -> datetime:
    """``moment`` with the tzinfo of pydantic's UTC device times: the same instant. A naive
    ``moment`` is returned as it is (and refused where an aware time is required)."""
    tz = moment.tzinfo
    if tz is _DEVICE_UTC or tz is None:
        return moment
    return _DEVICE_EPOCH + (as_utc(moment) - _EPOCH)
