"""What the routes of the features under two sign-offs (threshold changes, guidance for
families) share: the listing's filter, the approve and reject decision with its answers, and the
caller as the person who signs off (``service_layer/sign_off.py``)."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal, Protocol, TypeVar

from fastapi import HTTPException, Query, status

from services.api.domain.access import Principal
from services.api.entrypoints.http.responses import Problem, Responses, not_found
from services.api.service_layer.sign_off import Person, ProposalRefused, SignedProposal

Status = Literal["pending", "approved", "rejected", "withdrawn"]
StatusFilter = Annotated[Status | None, Query(alias="status")]
Limit = Annotated[int, Query(ge=1, le=500)]

DECIDED: Responses = {
    **not_found("proposal"),
    409: {"model": Problem, "description": "Already decided, or a version was written since."},
}

P = TypeVar("P", bound=SignedProposal)
P_co = TypeVar("P_co", bound=SignedProposal, covariant=True)


class Proposals(Protocol[P_co]):
    async def get(self, proposal_id: uuid.UUID) -> P_co | None: ...


class Decider(Protocol[P]):
    async def approve(self, by: Person, proposal: P) -> P: ...
    async def reject(self, by: Person, proposal: P) -> P: ...


def person(principal: Principal) -> Person:
    return Person(principal.user_id, principal.username)


async def decide(
    store: Proposals[P],
    changes: Decider[P],
    proposal_id: uuid.UUID,
    principal: Principal,
    approve: bool,
) -> P:
    """Approve or reject a proposal of one of the caller's care teams (404 otherwise); a refused
    decision answers its status (403 for the proposer's own approval, 409)."""
    proposal = await store.get(proposal_id)
    if proposal is None or not principal.sees_team(proposal.care_team_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such proposal")
    try:
        if approve:
            return await changes.approve(person(principal), proposal)
        return await changes.reject(person(principal), proposal)
    except ProposalRefused as refused:
        raise HTTPException(refused.status, str(refused)) from None
