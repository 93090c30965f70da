"""Routes of Twilio's webhooks: SMS replies (acknowledge by replying; from a caregiver's
number, a request for a call: ``service_layer/caregiver_calls.py``) and delivery status
callbacks. No bearer token: each form is checked against ``X-Twilio-Signature`` when a Twilio
auth token is set (``deps.twilio_form``)."""

import html

from fastapi import APIRouter, Request, Response

from services.notify.entrypoints.http.deps import Service, TwilioForm
from services.notify.service_layer.escalation import AckOutcome

router = APIRouter()


@router.post("/twilio/sms")
async def sms_reply(request: Request, form: TwilioForm, service: Service) -> Response:
    calls = getattr(request.app.state, "caregiver_calls", None)
    if calls is not None:
        answer = await calls.reply(sender=form.get("From", ""), body=form.get("Body", ""))
        if answer is not None:
            return _twiml(answer.text)
    result = await service.acknowledge_sms(sender=form.get("From", ""), body=form.get("Body", ""))
    text = {
        AckOutcome.ACKNOWLEDGED: "Acknowledged. Escalation stopped.",
        AckOutcome.ALREADY: f"Already acknowledged by {result.detail}.",
    }.get(result.outcome, f"Not acknowledged: {result.detail}.")
    return _twiml(text)


def _twiml(text: str) -> Response:
    twiml = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Response><Message>{html.escape(text)}</Message></Response>"
    )
    return Response(content=twiml, media_type="application/xml")


@router.post("/twilio/status", status_code=204)
async def sms_status(form: TwilioForm, service: Service) -> None:
    await service.sms_status(
        message_sid=form.get("MessageSid", ""),
        status=form.get("MessageStatus", ""),
        error_code=form.get("ErrorCode"),
    )
