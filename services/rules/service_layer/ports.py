"""What the rules' use cases need from the outside world, as protocols.

The Kafka adapters (``adapters/kafka.py``) and the configuration store
(``adapters/config_store.py``) implement them; unit tests pass in-memory fakes. A partition is
whatever the consumer names one by (``aiokafka.TopicPartition`` in the service): the use cases
read only its ``partition`` number and use it as a key.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from services.rules.domain.config import RulesConfig
from services.rules.domain.config_pieces import ConfigDelta


@dataclass(frozen=True, slots=True)
class Topics:
    """Where the rules read and write, and the consumer group whose offsets a batch commits."""

    telemetry: str
    alerts: str
    state: str
    deadletter: str
    group_id: str


class TelemetryRecord(Protocol):
    """One consumed telemetry record (``aiokafka.ConsumerRecord``)."""

    @property
    def offset(self) -> int: ...

    @property
    def value(self) -> bytes | None: ...


class TelemetryConsumer(Protocol):
    """The part of ``AIOKafkaConsumer`` the loop and the batch use."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def assignment(self) -> set[Any]: ...

    async def getmany(
        self, *, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[Any, list[Any]]: ...

    def last_stable_offset(self, tp: Any) -> int | None: ...

    async def position(self, tp: Any) -> int: ...


class TransactionalOutbox(Protocol):
    """The transactional producer: everything sent between ``begin`` and ``commit`` is
    published together or, after ``abort``, not at all. ``send`` and ``send_state`` queue
    records and return what resolves once they are delivered (inside the transaction)."""

    async def begin(self) -> None: ...

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None = None, partition: int | None = None
    ) -> Awaitable[Any]: ...

    async def send_state(
        self, topic: str, partition: int, records: list[tuple[str, bytes]]
    ) -> list[Awaitable[Any]]:
        """Queue keyed state records on one partition of ``topic``."""
        ...

    async def send_offsets(self, offsets: dict[Any, int], group_id: str) -> None:
        """The consumer offsets committed with the transaction."""
        ...

    async def commit(self) -> None: ...

    async def abort(self) -> None: ...

    async def stop(self) -> None: ...


class StateStore(Protocol):
    """The committed engine state of one telemetry partition (the state topic)."""

    async def load(self, partition: int) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
        """(the partition's watermark meta, or None; each patient's state by patient id)."""
        ...


class ConfigStore(Protocol):
    """Where the rules configuration comes from (settings, a pinned file or PostgreSQL)."""

    async def load(self) -> RulesConfig: ...

    def delta(self) -> tuple[str | None, ConfigDelta]:
        """What the last load changed, and the ``config_version`` it changed from."""
        ...

    def digest(self, config: RulesConfig) -> str | None:
        """The content hash of ``config`` when this store loaded it (None: compute it)."""
        ...
