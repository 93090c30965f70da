"""What ingest's service layer needs from the outside world, as protocols.

The Kafka producer (``adapters.kafka_batches.KafkaTelemetry``), PostgreSQL
(``adapters.postgres.PostgresTelemetryStore``) and the broker connection
(``adapters.mqtt_session.MqttSession``) implement them; unit tests pass in-memory fakes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Collection, Iterable, Sequence
from typing import Protocol

from schemas.events import DeadLetter, Telemetry
from services.ingest.domain.admission import DeviceSeen
from services.ingest.domain.registry import BindingIndex

# One MQTT message as ingest receives it: topic, payload, packet id (0: QoS 0, nothing to ack).
InboundMessage = tuple[str, bytes, int]


class TelemetryProducer(Protocol):
    async def send_telemetry(
        self, records: Iterable[tuple[int, Telemetry]], everywhere: Collection[int] = ()
    ) -> Sequence[tuple[list[int], Awaitable[object]]]:
        """Append ``(index, telemetry)`` records in order and return, per produce batch, the
        indices it holds and what resolves once Kafka has it (fails if Kafka refused it). An
        index in ``everywhere`` goes to every partition, so it is in several batches."""
        ...

    async def send_dead_letter(self, dead: DeadLetter) -> Awaitable[object]:
        """Append one dead letter; the result resolves once Kafka has it."""
        ...


class TelemetryStore(Protocol):
    async def load_bindings(self) -> BindingIndex: ...

    async def store_telemetry(self, accepted: Sequence[Telemetry]) -> int:
        """Store the readings of a batch at most once each; how many were new."""
        ...

    async def store_last_seen(self, seen: Sequence[DeviceSeen]) -> None: ...


class Acknowledger(Protocol):
    def ack(self, packet_ids: Sequence[int]) -> None:
        """Acknowledge these messages to the broker, in this order (0: QoS 0, none needed)."""
        ...


class AnswerSink(Protocol):
    def publish(self, topic: str, payload: bytes) -> bool:
        """Publish one answer to a device (QoS 1); False when not connected."""
        ...

    def backlog(self) -> int:
        """Answers published and not yet acknowledged by the broker, or queued to be sent."""
        ...
