"""FHIR search parameters as the FHIR interface accepts them, parsed without I/O.

``date`` takes the FHIR prefixes (``eq``, ``ge``, ``gt``, ``le``, ``lt``; none is ``eq``) on a
year, a month, a day or a time with its offset; a value names a range (``2026-03`` is all of
March) and the prefix compares the reading's instant with that range. Several ``date``
parameters all apply. A date without a time is taken in UTC; a time without an offset is an
error, so no naive time ever reaches a query.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from services.api.domain import fhir

_DATE = re.compile(r"^(?P<prefix>eq|ge|gt|le|lt)?(?P<value>\d{4}(-\d{2}(-\d{2}(T.+)?)?)?)$")


class SearchError(ValueError):
    """A search parameter FHIR would answer with 400 and an OperationOutcome."""


@dataclass(frozen=True, slots=True)
class TimeRange:
    """Instants ``since <= t < until``; either end may be open."""

    since: datetime | None = None
    until: datetime | None = None

    def narrowed(self, other: TimeRange) -> TimeRange:
        since = max((t for t in (self.since, other.since) if t is not None), default=None)
        until = min((t for t in (self.until, other.until) if t is not None), default=None)
        return TimeRange(since, until)


def _month_after(year: int, month: int) -> datetime:
    return datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)


def _value_range(value: str) -> tuple[datetime, datetime]:
    """The instants a FHIR date value names: [start, end)."""
    try:
        if len(value) == 4:
            year = int(value)
            return datetime(year, 1, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC)
        if len(value) == 7:
            year, month = int(value[:4]), int(value[5:7])
            return datetime(year, month, 1, tzinfo=UTC), _month_after(year, month)
        if len(value) == 10:
            day = datetime.fromisoformat(value).replace(tzinfo=UTC)
            return day, day + timedelta(days=1)
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise SearchError(f"not a FHIR date: {value}") from exc
    if at.utcoffset() is None:
        raise SearchError(f"a date with a time needs its UTC offset: {value}")
    # A time is precise to the second (or to its fraction): it names that one instant's second.
    return at, at + (timedelta(microseconds=1) if at.microsecond else timedelta(seconds=1))


def date_range(values: Iterable[str]) -> TimeRange:
    """The range every ``date`` parameter allows together."""
    result = TimeRange()
    for raw in values:
        match = _DATE.match(raw.strip())
        if match is None:
            raise SearchError(f"not a FHIR date search: {raw}")
        start, end = _value_range(match["value"])
        prefix = match["prefix"] or "eq"
        one = {
            "eq": TimeRange(start, end),
            "ge": TimeRange(start, None),
            "gt": TimeRange(end, None),
            "le": TimeRange(None, end),
            "lt": TimeRange(None, start),
        }[prefix]
        result = result.narrowed(one)
    return result


def reference_id(value: str, resource_type: str) -> str:
    """``Patient/P-1``, a full URL ending so, or a bare ``P-1`` -> ``P-1``."""
    value = value.strip()
    marker = f"{resource_type}/"
    if marker in value:
        value = value.rsplit(marker, 1)[1]
    elif "/" in value:
        raise SearchError(f"not a {resource_type} reference: {value}")
    if not value:
        raise SearchError(f"an empty {resource_type} reference")
    return value


@dataclass(frozen=True, slots=True)
class ObservationKinds:
    """Which kinds of Observation a ``code`` search asks for."""

    temperature: bool
    pump_status: bool


def observation_kinds(values: Iterable[str]) -> ObservationKinds:
    """``code`` tokens (``system|code``, ``|code`` or ``code``; commas mean OR; several
    parameters must all match): the kinds they select. No ``code`` selects both."""
    temperature = pump = True
    for raw in values:
        wanted_t = wanted_p = False
        for token in raw.split(","):
            system, _, code = token.rpartition("|") if "|" in token else (None, "", token)
            wanted_t |= _matches(system, code, fhir.TEMPERATURE_CODES)
            wanted_p |= _matches(system, code, fhir.PUMP_STATUS_CODES)
        temperature &= wanted_t
        pump &= wanted_p
    return ObservationKinds(temperature, pump)


def _matches(system: str | None, code: str, known: frozenset[tuple[str, str]]) -> bool:
    return any(c == code and (system is None or system == s) for s, c in known)
