"""The API's FastAPI dependencies and their ``Annotated`` aliases: the settings and the
escalation service the app was wired with (``app.state``, set by ``create_app`` and its
lifespan), Twilio's signed webhook forms."""

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from services.notify.adapters.twilio import twilio_signature
from services.notify.service_layer.api_ports import EscalationCommands
from services.notify.settings import NotifySettings


def get_settings(request: Request) -> NotifySettings:
    settings: NotifySettings = request.app.state.notify_settings
    return settings


def get_service(request: Request) -> EscalationCommands:
    service: EscalationCommands = request.app.state.service
    return service


Settings = Annotated[NotifySettings, Depends(get_settings)]
Service = Annotated[EscalationCommands, Depends(get_service)]


async def twilio_form(request: Request, settings: Settings) -> dict[str, str]:
    """A Twilio webhook's form, refused (403) when an auth token is set and the request's
    ``X-Twilio-Signature`` is not Twilio's signature of the public URL and the form."""
    form = {k: str(v) for k, v in (await request.form()).items()}
    token = settings.twilio_auth_token
    if token is not None:
        url = settings.public_base_url.rstrip("/") + request.url.path
        expected = twilio_signature(token.get_secret_value(), url, form)
        given = request.headers.get("X-Twilio-Signature", "")
        if not hmac.compare_digest(given, expected):
            raise HTTPException(status_code=403, detail="bad Twilio signature")
    return form


TwilioForm = Annotated[dict[str, str], Depends(twilio_form)]
