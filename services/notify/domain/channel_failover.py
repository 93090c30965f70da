"""What to do after one delivery attempt on one channel: done, retry later, or the next channel.

Pure. A person's contact methods are tried in rank order; a channel that refuses for good (a
permanent error) or keeps failing past ``max_tries`` hands the page to the next method, so one
dead channel never stops a page from reaching the person.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.notify.domain.backoff import backoff_delay_s


@dataclass(frozen=True, slots=True)
class Delivered:
    pass


@dataclass(frozen=True, slots=True)
class RetryLater:
    delay_s: float


@dataclass(frozen=True, slots=True)
class NextChannel:
    reason: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    """No channel is left: the page is failed for good and the escalation carries on."""

    reason: str


@dataclass(frozen=True, slots=True)
class OutcomeUnknown:
    """An attempt cut short by a stopped process whose outcome nothing can tell (e-mail has no
    lookup; an SMS the provider's list does not show), on a page that is not sent again because
    its chain stopped meanwhile: recorded as unknown, never as not sent."""

    reason: str


AttemptVerdict = Delivered | RetryLater | NextChannel | GiveUp | OutcomeUnknown


def after_attempt(
    *,
    accepted: bool,
    permanent: bool,
    tries: int,
    max_tries: int,
    has_next_channel: bool,
    base_s: float,
    cap_s: float,
) -> AttemptVerdict:
    """``tries`` counts the attempts on this channel including the one just made."""
    if accepted:
        return Delivered()
    if not permanent and tries < max_tries:
        return RetryLater(backoff_delay_s(tries, base_s=base_s, cap_s=cap_s))
    reason = "permanent failure" if permanent else f"{tries} tries failed"
    if has_next_channel:
        return NextChannel(reason)
    return GiveUp(reason)
