"""Bulk export jobs (FHIR Bulk Data ``Patient/$export``): run in the API process, kept in memory.

A kick-off starts a job as an asyncio task; the job reads each patient's course through
:class:`~services.api.adapters.fhir.FhirRepository`, maps it with ``services.api.domain.fhir``
and keeps one NDJSON file per resource type. Its owner polls the status URL and then downloads
the files. Jobs live in the process that started them and are dropped ``RETENTION`` after they
finish (or on restart, when a client kicks off again): with several API replicas the status and
file URLs must reach the replica that answered the kick-off (docs/fhir.md).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson

from services.api.adapters.fhir import FhirRepository
from services.api.domain import fhir
from services.api.domain.fhir_capability import EXPORT_TYPES

#: How long a finished job's files stay available.
RETENTION = timedelta(hours=1)
#: Jobs one user may have unfinished at once.
MAX_RUNNING_PER_USER = 2


@dataclass
class ExportJob:
    job_id: str
    owner: str
    #: The one patient of a patient-level token that started the job (None: user-level).
    scope_patient: str | None
    request_url: str
    transaction_time: datetime
    patient_ids: list[str]
    types: tuple[str, ...]
    since: datetime | None
    status: str = "running"  # running | complete | failed
    done_patients: int = 0
    files: dict[str, bytes] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    finished_at: datetime | None = None
    task: asyncio.Task[None] | None = None


async def patient_course(
    repository: FhirRepository,
    teams: frozenset[str],
    patient_id: str,
    types: Iterable[str],
    since: datetime | None,
) -> dict[str, tuple[int, bytes]]:
    """Every resource of one patient's course as NDJSON, by type, with its count: the patient,
    its devices, every temperature reading and pump status, every alert episode and its pages.

    Each resource is serialised as soon as it is mapped, so a course's tens of thousands of
    resources never live as dicts at once: holding them all made the garbage collector
    re-scan an ever larger heap, six times the cost of mapping and serialising itself."""
    wanted = set(types)
    out: dict[str, tuple[int, bytes]] = {}
    if "Patient" in wanted:
        out["Patient"] = (1, _line(fhir.patient(patient_id)))
    if "Device" in wanted:
        out["Device"] = _ndjson(_line_of(fhir.device), await repository.devices_of(patient_id))
    if "Observation" in wanted:
        # The two reads run at once, on two of the pool's connections: the database works on
        # the pump statuses while the temperatures arrive.
        pumps, temperatures = await asyncio.gather(
            repository.pump_statuses(patient_id, since),
            repository.temperatures(patient_id, since),
        )
        count, temperature_lines = _ndjson(_line_of(fhir.temperature_observation), temperatures)
        del temperatures
        more, pump_lines = fhir.pump_status_lines(pumps)
        del pumps
        out["Observation"] = (count + more, temperature_lines + pump_lines)
    if "Flag" in wanted or "Communication" in wanted:
        episodes = await repository.episodes(teams, patient_id)
        if since is not None:
            episodes = [e for e in episodes if e["updated_at"] >= since]
        if "Flag" in wanted:
            out["Flag"] = _ndjson(_line_of(fhir.flag), episodes)
        if "Communication" in wanted:
            pages = await repository.pages(patient_id, [e["dedup_key"] for e in episodes])
            by_key: dict[str, list[dict[str, Any]]] = {}
            for page in pages:
                by_key.setdefault(page["dedup_key"], []).append(page)
            communications = [
                c
                for episode in episodes
                for c in fhir.episode_communications(episode, by_key.get(episode["dedup_key"], []))
            ]
            out["Communication"] = (len(communications), ndjson(communications))
    return {t: out[t] for t in EXPORT_TYPES if t in out}


def _line(resource: dict[str, Any]) -> bytes:
    return orjson.dumps(resource, option=orjson.OPT_APPEND_NEWLINE)


def _line_of(mapping: Callable[[Any], dict[str, Any]]) -> Callable[[Any], bytes]:
    return lambda row: _line(mapping(row))


def _ndjson(line: Callable[[Any], bytes], rows: Iterable[Any]) -> tuple[int, bytes]:
    lines = [line(row) for row in rows]
    return len(lines), b"".join(lines)


def ndjson(resources: Iterable[dict[str, Any]]) -> bytes:
    """One resource per line, each line ending in a newline."""
    return b"".join(_line(r) for r in resources)


class ExportJobs:
    """The process's export jobs, by id."""

    def __init__(self, repository: FhirRepository, clock: Callable[[], datetime]) -> None:
        self._repository = repository
        self._clock = clock
        self._jobs: dict[str, ExportJob] = {}

    def _expire(self) -> None:
        now = self._clock()
        for job_id, job in list(self._jobs.items()):
            if job.finished_at is not None and now - job.finished_at > RETENTION:
                del self._jobs[job_id]

    def running_for(self, owner: str) -> int:
        self._expire()
        return sum(1 for j in self._jobs.values() if j.owner == owner and j.status == "running")

    def start(
        self,
        *,
        owner: str,
        scope_patient: str | None = None,
        teams: frozenset[str],
        request_url: str,
        patient_ids: list[str],
        types: tuple[str, ...],
        since: datetime | None,
    ) -> ExportJob:
        job = ExportJob(
            job_id=uuid.uuid4().hex,
            owner=owner,
            scope_patient=scope_patient,
            request_url=request_url,
            transaction_time=self._clock(),
            patient_ids=patient_ids,
            types=types,
            since=since,
        )
        self._jobs[job.job_id] = job
        job.task = asyncio.create_task(self._run(job, teams), name=f"fhir-export-{job.job_id}")
        return job

    async def _run(self, job: ExportJob, teams: frozenset[str]) -> None:
        collected: dict[str, list[bytes]] = {t: [] for t in job.types}
        counts = dict.fromkeys(job.types, 0)
        try:
            for patient_id in job.patient_ids:
                course = await patient_course(
                    self._repository, teams, patient_id, job.types, job.since
                )
                for resource_type, (count, lines) in course.items():
                    collected[resource_type].append(lines)
                    counts[resource_type] += count
                job.done_patients += 1
        except Exception as exc:  # the job fails, the status URL says so; the API lives on
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
        else:
            job.files = {t: b"".join(parts) for t, parts in collected.items() if counts[t]}
            job.counts = {t: c for t, c in counts.items() if c}
            job.status = "complete"
        job.finished_at = self._clock()

    def get(self, job_id: str, owner: str, patient: str | None = None) -> ExportJob | None:
        """The job, only for the user who started it; for a caller limited to one ``patient``,
        only a job started with that same limit."""
        self._expire()
        job = self._jobs.get(job_id)
        if job is None or job.owner != owner:
            return None
        if patient is not None and job.scope_patient != patient:
            return None
        return job

    def delete(self, job_id: str, owner: str, patient: str | None = None) -> bool:
        job = self.get(job_id, owner, patient)
        if job is None:
            return False
        if job.task is not None and not job.task.done():
            job.task.cancel()
        del self._jobs[job_id]
        return True

    async def close(self) -> None:
        for job in self._jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()
        await asyncio.gather(
            *(j.task for j in self._jobs.values() if j.task is not None), return_exceptions=True
        )
