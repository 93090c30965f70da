"""What ingest tells a device about its messages: the end-to-end acknowledgement (version 1).

A PUBACK only says the broker has a message; a broker crash between its PUBACK and its next save
can still lose it (docs/reliability.md). Ingest therefore answers every message it has decided
and made durable, per device, on ``vigil/v1/ack/{device_id}`` (QoS 1): the messages now stored in
Vigil (including retransmissions of messages stored before), and the messages rejected for good,
with their reason. A device keeps each message in its outbox until it is named in one of these,
and sends it again, byte for byte, when none has come for it in time (docs/mqtt.md, section 4.1).
"""

from __future__ import annotations

from typing import Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.device import DeviceId

#: The topic level under which ingest publishes acknowledgements.
ACK_PREFIX = "vigil/v1/ack"
ACK_SCHEMA = "vigil.ingest.ack.v1"


def ack_topic(device_id: str) -> str:
    return f"{ACK_PREFIX}/{device_id}"


class StoredMessage(BaseModel):
    """A message Vigil has stored (or had stored already: a retransmission is stored once)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    message_id: UUID
    seq: int = Field(ge=0, le=2**63 - 1)


class RejectedMessage(BaseModel):
    """A message Vigil rejected for good: sending it again cannot change the outcome."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    message_id: UUID | None = Field(
        default=None, description="The payload's message_id, when it has a valid one."
    )
    seq: int | None = Field(
        default=None, ge=0, le=2**63 - 1, description="The payload's seq, when it has a valid one."
    )
    payload_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the payload as received, lowercase hex: identifies a message "
        "whose message_id could not be read.",
    )
    reason: str = Field(description="The dead-letter reason code (docs/mqtt.md, section 5.1).")


class IngestAck(BaseModel):
    """Messages of one device that ingest has made durable or rejected, since its last ack."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: Literal["vigil.ingest.ack.v1"] = Field(default="vigil.ingest.ack.v1", alias="schema")
    device_id: DeviceId
    ingest_time: AwareDatetime = Field(
        description="When ingest published this acknowledgement (its clock, RFC 3339, UTC)."
    )
    stored: list[StoredMessage] = Field(
        default_factory=list,
        description="Messages in Kafka and PostgreSQL: remove them from the outbox.",
    )
    rejected: list[RejectedMessage] = Field(
        default_factory=list,
        description="Messages dead-lettered with a reason: remove them too, and report them.",
    )
