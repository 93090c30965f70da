"""The alert timeline names what the family was told (docs/caregivers.md)."""

from __future__ import annotations

from datetime import UTC, datetime

from services.api.domain.timeline import timeline

AT = datetime(2026, 1, 15, 2, 0, 5, tzinfo=UTC)


def test_family_messages_in_the_timeline() -> None:
    notify = {
        "events": [
            {
                "kind": "caregiver_told",
                "at": AT,
                "detail": {"kind": "paged", "channels": ["email", "sms"], "contacts": ["c1"]},
            },
            {
                "kind": "caregiver_not_told",
                "at": AT,
                "detail": {"kind": "paged", "contact_id": "c2", "reason": "no consent"},
            },
        ],
        "attempts": [
            {
                "at": AT,
                "purpose": "caregiver",
                "recipient": "+33612345678",
                "channel": "sms",
                "status": "failed",
                "detail": "503 twilio error",
            }
        ],
    }
    texts = [e.text for e in timeline([], notify, "Europe/Paris")]
    assert texts == [
        "Family told that the care team was alerted by email and sms",
        "Family contact not told that the care team was alerted: no consent",
        "Family message to +33612345678 by sms: failed (503 twilio error)",
    ]
