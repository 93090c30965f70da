"""The notify service's pure core: whom to page, what the page says, when to retry.

No asyncio, no I/O, no wall clock: every input (the alert, the frozen policy, the time a message
is composed) is passed in, so a replay makes the same decisions and the same e-mails byte for
byte.
"""

from services.notify.domain.backoff import backoff_delay_s
from services.notify.domain.message import compose_page_email, message_id_for, page_subject
from services.notify.domain.routing import (
    UNASSIGNED_CARE_TEAM,
    PagePurpose,
    page_id_for,
    purpose_of,
)

__all__ = [
    "UNASSIGNED_CARE_TEAM",
    "PagePurpose",
    "backoff_delay_s",
    "compose_page_email",
    "message_id_for",
    "page_id_for",
    "page_subject",
    "purpose_of",
]
