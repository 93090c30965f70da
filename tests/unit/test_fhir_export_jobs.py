"""A replica asked for a file of an export another replica holds asks for the files to be
stored and waits for the store, and gives up when the job fails or is deleted (ExportJobs over
a fake repository)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from services.api.adapters.fhir import FhirRepository
from services.api.service_layer import fhir_export
from services.api.service_layer.fhir_export import ExportJobs

NOW = datetime(2026, 12, 7, 4, 0, tzinfo=UTC)


class StoringRepository:
    """The job's row as another replica stores its files: running with its files made for
    the first ``storing_reads`` reads (get's included), then ``then`` (a status, or None:
    deleted)."""

    def __init__(self, storing_reads: int, then: str | None) -> None:
        self.reads = 0
        self.wanted: list[str] = []
        self._storing_reads = storing_reads
        self._then = then

    def row(self, status: str) -> dict[str, Any]:
        return {
            "job_id": "job-1",
            "owner": "user-1",
            "scope_patient": None,
            "request_url": "http://api.test/fhir/Patient/$export",
            "transaction_time": NOW,
            "patient_ids": ["P-1"],
            "types": ["Patient"],
            "status": status,
            "done_patients": 1,
            "counts": {"Patient": 1},
            "error": "boom" if status == "failed" else None,
            "finished_at": NOW,
        }

    async def fail_exports(self, *args: Any, **kwargs: Any) -> int:
        return 0

    async def want_export(self, job_id: str) -> None:
        self.wanted.append(job_id)

    async def export_job(self, job_id: str) -> dict[str, Any] | None:
        self.reads += 1
        if self.reads <= self._storing_reads:
            return self.row("running")
        return None if self._then is None else self.row(self._then)


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(fhir_export, "STORE_POLL_S", 0.001)
    yield


@pytest.mark.parametrize(("then", "served"), [("complete", True), ("failed", False), (None, False)])
async def test_a_file_being_stored_elsewhere_is_waited_for(then: str | None, served: bool) -> None:
    repository = StoringRepository(storing_reads=3, then=then)
    jobs = ExportJobs(cast(FhirRepository, repository), lambda: NOW)
    job = await jobs.get("job-1", "user-1")
    assert job is not None and job.storing and job.status == "running"
    assert await jobs.wait_stored(job) is served
    assert repository.wanted == ["job-1"]  # the replica holding the files was asked for them
    assert repository.reads == 4  # get's read, then polled until the row changed, no more


async def test_a_job_not_being_stored_is_not_waited_for() -> None:
    repository = StoringRepository(storing_reads=0, then="complete")
    jobs = ExportJobs(cast(FhirRepository, repository), lambda: NOW)
    job = await jobs.get("job-1", "user-1")
    assert job is not None and job.status == "complete" and not job.storing
    assert await jobs.wait_stored(job) is True
    assert repository.reads == 1 and repository.wanted == []
