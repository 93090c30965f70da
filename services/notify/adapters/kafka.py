"""Publishing notify's rejected alert records onto Kafka (the dead-letter topic).

Owns the record keys and topics of notify's output; it does not decide anything and does not
consume (``app`` drives the consumer).
"""

from __future__ import annotations

from typing import Any

from schemas.events import DeadLetter
from schemas.kafka_topics import DEADLETTER_TOPIC
from vigil.kafka import encode


class KafkaDeadLetterPublisher:
    """Dead letters of alert records notify could not read."""

    def __init__(self, producer: Any) -> None:
        # aiokafka ships no type information; the producer is an AIOKafkaProducer.
        self._producer = producer

    async def publish_dead_letter(self, letter: DeadLetter) -> None:
        await self._producer.send_and_wait(DEADLETTER_TOPIC, encode(letter))
