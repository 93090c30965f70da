"""A caregiver page in each channel's form (``domain.caregiver`` decided its words, stored with
the page): the SMS is the body and the page's reference, the e-mail the same words."""

from __future__ import annotations

from email.message import EmailMessage

from services.notify.domain.caregiver import compose_caregiver_email
from services.notify.service_layer.channels import OutboundPage
from services.notify.service_layer.ports import PageJob


def caregiver_outbound(job: PageJob, *, sender: str, reference: str) -> OutboundPage | None:
    """None when the page's words are missing (nothing true can be sent)."""
    if job.caregiver is None:
        return None
    subject, body = job.caregiver
    page = job.page

    def email() -> EmailMessage:
        return compose_caregiver_email(
            subject, body, to=page.recipient, sender=sender, idempotency_key=page.idempotency_key
        )

    def text() -> str:
        # The reference lets a page cut short by a stop be found at the provider.
        return f"{body} (Ref {reference})"

    def event() -> dict[str, object]:
        raise ValueError("a caregiver message has no PagerDuty form")

    return OutboundPage(recipient=page.recipient, email=email, text=text, event=event)
