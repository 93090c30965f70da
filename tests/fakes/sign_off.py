"""In-memory pieces of the stores of the features under two sign-offs
(services/api/service_layer/sign_off.py): the proposals and their decisions, and an audit log
that keeps its entries."""

from __future__ import annotations

import uuid
from typing import Any, Generic, TypeVar

from services.api.service_layer.sign_off import SignedProposal

P = TypeVar("P", bound=SignedProposal)


class MemoryProposals(Generic[P]):
    def __init__(self) -> None:
        self.proposals: dict[uuid.UUID, P] = {}

    async def get(self, proposal_id: uuid.UUID) -> P | None:
        return self.proposals.get(proposal_id)

    async def add(self, proposal: P) -> None:
        self.proposals[proposal.proposal_id] = proposal

    async def decide(self, proposal: P) -> bool:
        if self.proposals[proposal.proposal_id].decision is not None:
            return False
        self.proposals[proposal.proposal_id] = proposal
        return True


class MemoryAudit:
    def __init__(self) -> None:
        self.entries: list[tuple[str, str, str, dict[str, Any]]] = []

    async def record(self, actor: str, action: str, subject: str, details: dict[str, Any]) -> None:
        self.entries.append((actor, action, subject, details))
