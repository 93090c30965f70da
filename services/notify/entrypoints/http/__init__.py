"""Notify's HTTP API as FastAPI routers: the signed acknowledgement links in pages and Twilio's
signed webhooks, each its own credential (a care team's paging is managed through the
care-team API). ``ROUTERS`` in the order their routes are served (and listed in the OpenAPI
document). ``services/notify/api.py`` wires them into an app."""

from fastapi import APIRouter

from services.notify.entrypoints.http.ack_links import router as ack_links_router
from services.notify.entrypoints.http.twilio import router as twilio_router

ROUTERS: tuple[APIRouter, ...] = (ack_links_router, twilio_router)
