"""Routes of the signed acknowledgement links in pages: a GET shows a button, the POST it sends
acknowledges. No bearer token: the signed link is the credential."""

import html

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from services.notify.domain.ack_token import InvalidAckToken
from services.notify.entrypoints.http.deps import Service
from services.notify.service_layer.escalation import AckOutcome

router = APIRouter()


@router.get("/ack/{token}", response_class=HTMLResponse)
async def ack_page(token: str, service: Service) -> HTMLResponse:
    # A GET only shows a button: mail scanners that open every link must not acknowledge.
    try:
        service.check_token(token)
    except InvalidAckToken as exc:
        return HTMLResponse(_html(f"This link cannot be used: {_esc(exc)}."), status_code=410)
    form = (
        f'<form method="post" action="/ack/{html.escape(token)}">'
        '<button type="submit" style="font-size:2em">Acknowledge</button></form>'
    )
    return HTMLResponse(_html("Acknowledge this page and stop further escalation?" + form))


@router.post("/ack/{token}", response_class=HTMLResponse)
async def ack_link(token: str, service: Service) -> HTMLResponse:
    result = await service.acknowledge_token(token)
    if result.outcome is AckOutcome.ACKNOWLEDGED:
        return HTMLResponse(_html("Acknowledged. Escalation stopped."))
    if result.outcome is AckOutcome.ALREADY:
        return HTMLResponse(_html(f"Already acknowledged by {_esc(result.detail)}."))
    return HTMLResponse(_html(f"Not acknowledged: {_esc(result.detail)}."), status_code=410)


def _esc(value: object) -> str:
    return html.escape(str(value))


def _html(body: str) -> str:
    return (
        '<!doctype html><html><head><meta name="viewport" content="width=device-width">'
        f"<title>Vigil</title></head><body><p>{body}</p></body></html>"
    )
