"""Publishing what notify did onto Kafka: delivery attempts and rejected alert records.

Owns the record keys and topics of notify's output; it does not decide anything and does not
consume (``app`` drives the consumer).
"""

from __future__ import annotations

from typing import Any

from schemas.events import DeadLetter, DeliveryAttempt
from schemas.kafka_topics import DEADLETTER_TOPIC, DELIVERIES_TOPIC
from vigil.kafka import encode


class KafkaDeliveryPublisher:
    """Delivery attempts keyed by page id, so each page's attempts stay in order on a partition."""

    def __init__(self, producer: Any) -> None:
        # aiokafka ships no type information; the producer is an AIOKafkaProducer.
        self._producer = producer

    async def publish_attempt(self, attempt: DeliveryAttempt) -> None:
        await self._producer.send_and_wait(
            DELIVERIES_TOPIC, encode(attempt), key=str(attempt.page_id).encode()
        )

    async def publish_dead_letter(self, letter: DeadLetter) -> None:
        await self._producer.send_and_wait(DEADLETTER_TOPIC, encode(letter))
