"""The answers every route may give besides its own, declared once so the OpenAPI document lists
exactly what the API answers: 401 and 403 on every authenticated route, 404 on the routes that
look a patient, an alert or a care team up, and 422 always in FastAPI's validation shape (a
check of the request beyond its types raises ``invalid``, not a bare message)."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel


class Problem(BaseModel):
    detail: str


Responses = dict[int | str, dict[str, Any]]

AUTHENTICATED: Responses = {
    401: {
        "model": Problem,
        "description": "No valid token (bearer, or the dashboard's cookie), or one ended by "
        "logout.",
    },
    403: {
        "model": Problem,
        "description": "The caller's role may not do this, or a write through the dashboard's "
        "cookie without the X-Requested-By header.",
    },
}


def not_found(what: str) -> Responses:
    return {
        404: {
            "model": Problem,
            "description": f"No such {what} in the caller's care teams: one of another team "
            "answers the same as one that does not exist.",
        }
    }


def invalid(field: str, message: str, *, where: str = "query") -> RequestValidationError:
    """A request that passed its types but not a check of its meaning, answered as FastAPI
    answers a validation error (422, ``detail``: a list of ``{loc, msg, type}``)."""
    return RequestValidationError([{"loc": (where, field), "msg": message, "type": "value_error"}])
