"""What the fault suite counts besides stored rows: telemetry records in Kafka, and the pages a
fever causes, read from the stack's SMTP sink and from the alerts table.

``telemetry_ends`` / ``telemetry_copies``: the telemetry topic's end offsets before a fault's
load, and afterwards every record from those offsets to the then current end, counted by the
device message id it carries (a copy beyond the first is a duplicate in Kafka).

``MailSink`` reads the ``.eml`` files the stack's sink writes (one per message received, written
atomically), each file once. A **first page** about a patient is a message whose subject names the
patient and that is not a repeat of an earlier page (no ``X-Vigil-Repeat`` header: docs/notify.md,
"A repeat says so"); an all clear is not a first page either.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from pathlib import Path

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer

from schemas.kafka_topics import TELEMETRY_TOPIC
from tests.e2e.conftest import topic_partitions
from tests.polling import eventually_sync


def telemetry_ends(bootstrap: str) -> dict[int, int]:
    """The telemetry topic's end offset per partition, now."""

    async def ends() -> dict[int, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            found = await consumer.end_offsets(await topic_partitions(bootstrap, TELEMETRY_TOPIC))
        finally:
            await consumer.stop()
        return {tp.partition: offset for tp, offset in found.items()}

    return asyncio.run(ends())


def telemetry_copies(
    bootstrap: str, since: dict[int, int], message_ids: Collection[str], timeout_s: float = 60.0
) -> Counter[str]:
    """How many telemetry records carry each of ``message_ids``, from ``since`` to the end."""
    wanted = set(message_ids)

    async def count() -> Counter[str]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            max_poll_records=5000,
        )
        await consumer.start()
        copies: Counter[str] = Counter()
        try:
            partitions = await topic_partitions(bootstrap, TELEMETRY_TOPIC)
            consumer.assign(partitions)
            for tp in partitions:
                consumer.seek(tp, since.get(tp.partition, 0))
            ends = await consumer.end_offsets(partitions)
            deadline = time.monotonic() + timeout_s
            while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
                if time.monotonic() > deadline:
                    raise TimeoutError("the telemetry topic could not be read to its end")
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        message_id = orjson.loads(record.value or b"{}")["message"]["message_id"]
                        if message_id in wanted:
                            copies[message_id] += 1
        finally:
            await consumer.stop()
        return copies

    return asyncio.run(count())


@dataclass(frozen=True)
class Mail:
    file: str
    headers: Message

    @property
    def subject(self) -> str:
        return str(self.headers.get("Subject", ""))

    def first_page_about(self, patient_id: str) -> bool:
        return (
            patient_id in self.subject
            and self.headers.get("X-Vigil-Repeat") is None
            and self.headers.get("X-Vigil-All-Clear") is None
        )


class MailSink:
    """The messages in the stack's sink directory, read incrementally."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.mails: list[Mail] = []
        self._seen: set[str] = set()

    def refresh(self) -> list[Mail]:
        for path in sorted(self.directory.glob("*.eml")):
            if path.name in self._seen:
                continue
            self._seen.add(path.name)
            headers = BytesHeaderParser().parsebytes(path.read_bytes())
            self.mails.append(Mail(path.name, headers))
        return self.mails

    def first_pages(self, patient_id: str) -> list[Mail]:
        return [m for m in self.refresh() if m.first_page_about(patient_id)]

    def wait_first_page(self, patient_id: str, timeout_s: float) -> float:
        """Wait until a first page about ``patient_id`` is in the sink; the seconds it took."""
        started = time.monotonic()
        eventually_sync(
            lambda: bool(self.first_pages(patient_id)),
            timeout_s=timeout_s,
            interval_s=0.02,
            what=f"a page {patient_id}",
        )
        return time.monotonic() - started


async def alerts_started(dsn: str, patient_id: str) -> int:
    """Alerts notify recorded as the start of an episode for ``patient_id``."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM alerts WHERE patient_id = $1 AND phase = 'start'",
                patient_id,
            )
        )
    finally:
        await conn.close()
