"""Bulk export jobs (FHIR Bulk Data ``Patient/$export``), shared by the API replicas.

A kick-off records the job in the repository (migration 0036) and starts it as an asyncio task
of the replica that answered; the job reads each patient's course through
:class:`~services.api.adapters.fhir.FhirRepository`, maps it with ``services.api.domain.fhir``
and makes one NDJSON file per resource type. That replica answers from memory as soon as the
files are made; it then stores them, and the job is complete for every replica. Its owner
polls the status URL and downloads the files from any replica. While a job runs its replica
touches its row; a running job left untouched for ``SILENT`` (its replica stopped or restarted)
is reported failed, and a replica that shuts down fails its running jobs at once. Jobs are
dropped ``RETENTION`` after they finish.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
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
#: A running job's replica touches its row this often; a running job silent for ``SILENT``
#: is reported failed (its replica stopped or restarted).
ALIVE_EVERY = timedelta(seconds=15)
SILENT = timedelta(minutes=1)
STOPPED = "the API replica running the export stopped"
#: Files are stored, and sent, in pieces of this size.
FILE_PIECE = 1 << 20
#: How long a replica asked for a file of a job another replica is storing waits for it, and
#: how often it looks.
STORE_WAIT = timedelta(minutes=1)
STORE_POLL_S = 0.05


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
    #: A job of another replica, read from the repository: its files are stored, not here.
    stored: bool = False
    #: Set once this replica's files of the job are stored for the other replicas.
    saved: asyncio.Event = field(default_factory=asyncio.Event)
    saving: asyncio.Task[None] | None = None

    @property
    def storing(self) -> bool:
        """Its files are made (on the replica that ran it) and being stored."""
        return self.stored and self.status == "running" and self.finished_at is not None


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
    # The pump statuses, most of a course, are read first, on a connection of their own: the
    # database works on them while this task reads and maps everything else.
    pump_read = (
        asyncio.ensure_future(repository.pump_statuses(patient_id, since))
        if "Observation" in wanted
        else None
    )
    try:
        await _course_but_pumps(repository, teams, patient_id, wanted, since, out)
        if pump_read is not None:
            count, temperature_lines = out["Observation"]
            more, pump_lines = fhir.pump_status_lines(await pump_read)
            out["Observation"] = (count + more, temperature_lines + pump_lines)
    finally:
        if pump_read is not None:  # a failure elsewhere stops the read and collects it
            pump_read.cancel()
            await asyncio.gather(pump_read, return_exceptions=True)
    return {t: out[t] for t in EXPORT_TYPES if t in out}


async def _course_but_pumps(
    repository: FhirRepository,
    teams: frozenset[str],
    patient_id: str,
    wanted: set[str],
    since: datetime | None,
    out: dict[str, tuple[int, bytes]],
) -> None:
    """Everything of the course but the pump statuses, as NDJSON by type, into ``out``."""
    if "Patient" in wanted:
        out["Patient"] = (1, _line(fhir.patient(patient_id)))
    if "Device" in wanted:
        out["Device"] = _ndjson(_line_of(fhir.device), await repository.devices_of(patient_id))
    if "Observation" in wanted:
        out["Observation"] = _ndjson(
            _line_of(fhir.temperature_observation),
            await repository.temperatures(patient_id, since),
        )
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
    """The export jobs: those this process runs, in memory, and every replica's in the
    repository (migration 0036), so that any replica answers a job's status and files."""

    def __init__(self, repository: FhirRepository, clock: Callable[[], datetime]) -> None:
        self._repository = repository
        self._clock = clock
        self._jobs: dict[str, ExportJob] = {}
        self._stop_listening: Callable[[], Awaitable[None]] | None = None

    def _expire(self) -> None:
        now = self._clock()
        for job_id, job in list(self._jobs.items()):
            if job.finished_at is not None and now - job.finished_at > RETENTION:
                del self._jobs[job_id]
                if job.task is not None:
                    job.task.cancel()

    def _wanted(self, job_id: str) -> None:
        """Another replica was asked for a job: if this replica holds its files unsaved, it
        stores them now."""
        job = self._jobs.get(job_id)
        if job is not None and job.status == "complete" and job.saving is None:
            job.saving = asyncio.create_task(self._save(job), name=f"fhir-export-save-{job_id}")

    async def _save(self, job: ExportJob) -> None:
        try:
            await self._repository.finish_export(
                job.job_id, list(_pieces(job.files)), job.counts, self._clock()
            )
        except Exception as exc:  # the other replicas report the job failed; this one serves it
            await self._repository.fail_exports(
                f"storing the files failed: {type(exc).__name__}: {exc}",
                self._clock(),
                job_ids=[job.job_id],
            )
        finally:
            job.saved.set()

    async def _fail_silent(self) -> None:
        """Fail the running jobs whose replica stopped touching them (it stopped or restarted)."""
        now = self._clock()
        await self._repository.fail_exports(STOPPED, now, silent_since=now - SILENT)

    async def running_for(self, owner: str) -> int:
        """The user's unfinished jobs, on every replica."""
        self._expire()
        await self._fail_silent()
        return await self._repository.running_exports(owner)

    async def start(
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
        await self._repository.delete_exports(finished_before=job.transaction_time - RETENTION)
        if self._stop_listening is None:
            self._stop_listening = await self._repository.listen_for_wanted(self._wanted)
        await self._repository.create_export(
            {
                "job_id": job.job_id,
                "owner": owner,
                "scope_patient": scope_patient,
                "request_url": request_url,
                "transaction_time": job.transaction_time,
                "patient_ids": patient_ids,
                "types": types,
            }
        )
        self._jobs[job.job_id] = job
        job.task = asyncio.create_task(self._run(job, teams), name=f"fhir-export-{job.job_id}")
        return job

    async def _keep_alive(self, job: ExportJob) -> None:
        while True:
            await asyncio.sleep(ALIVE_EVERY.total_seconds())
            await self._repository.export_alive(job.job_id, job.done_patients, self._clock())

    async def _run(self, job: ExportJob, teams: frozenset[str]) -> None:
        """The export, then, while this replica holds its files unsaved, its row kept touched
        (the job lives here until another replica asks for it and it is stored)."""
        alive = asyncio.create_task(self._keep_alive(job), name=f"fhir-export-alive-{job.job_id}")
        try:
            await self._export(job, teams)
            if job.status == "complete":
                await job.saved.wait()
        finally:
            alive.cancel()
            if job.saving is not None and not job.saving.done():
                job.saving.cancel()

    async def _export(self, job: ExportJob, teams: frozenset[str]) -> None:
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
            job.finished_at = self._clock()
            await self._repository.fail_exports(job.error, job.finished_at, job_ids=[job.job_id])
            return
        job.files = {t: b"".join(parts) for t, parts in collected.items() if counts[t]}
        job.counts = {t: c for t, c in counts.items() if c}
        finished_at = self._clock()
        # Said before this replica answers from memory: a client handed the manifest here may
        # ask another replica for a file; that replica then asks for the files (``want``) and
        # waits for them to be stored.
        await self._repository.export_files_made(job.job_id, job.counts, finished_at)
        job.status, job.finished_at = "complete", finished_at

    async def get(self, job_id: str, owner: str, patient: str | None = None) -> ExportJob | None:
        """The job, only for the user who started it; for a caller limited to one ``patient``,
        only a job started with that same limit. A job of another replica comes from the
        repository, without its files (``stored_file`` reads them)."""
        self._expire()
        job = self._jobs.get(job_id)
        if job is not None and not await self._repository.export_exists(job_id):
            # Deleted through another replica.
            self._jobs.pop(job_id, None)
            if job.task is not None and not job.task.done():
                job.task.cancel()
            return None
        if job is None:
            await self._fail_silent()
            row = await self._repository.export_job(job_id)
            if row is None:
                return None
            job = ExportJob(
                job_id=row["job_id"],
                owner=row["owner"],
                scope_patient=row["scope_patient"],
                request_url=row["request_url"],
                transaction_time=row["transaction_time"],
                patient_ids=list(row["patient_ids"]),
                types=tuple(row["types"]),
                since=None,
                status=row["status"],
                done_patients=row["done_patients"],
                counts=dict(row["counts"]),
                error=row["error"],
                finished_at=row["finished_at"],
                stored=True,
            )
            if job.finished_at is not None and self._clock() - job.finished_at > RETENTION:
                return None
        if job.owner != owner or (patient is not None and job.scope_patient != patient):
            return None
        return job

    async def want(self, job: ExportJob) -> None:
        """Ask the replica holding a job's files to store them (``storing`` jobs)."""
        await self._repository.want_export(job.job_id)

    async def wait_stored(self, job: ExportJob) -> bool:
        """For a job whose files another replica holds: ask for them and wait until they are
        stored (True) or the job failed or went away (False)."""
        if job.storing:
            await self.want(job)
        deadline = self._clock() + STORE_WAIT
        while job.storing and self._clock() < deadline:
            await asyncio.sleep(STORE_POLL_S)
            row = await self._repository.export_job(job.job_id)
            if row is None:
                return False
            job.status, job.error = row["status"], row["error"]
        return job.status == "complete"

    def stored_file(self, job: ExportJob, resource_type: str) -> AsyncIterator[bytes]:
        """A file of a job another replica ran, from the repository, piece by piece."""
        return self._repository.export_file(job.job_id, resource_type)

    async def delete(self, job_id: str, owner: str, patient: str | None = None) -> bool:
        job = await self.get(job_id, owner, patient)
        if job is None:
            return False
        local = self._jobs.pop(job_id, None)
        if local is not None and local.task is not None and not local.task.done():
            local.task.cancel()
            await asyncio.gather(local.task, return_exceptions=True)
        await self._repository.delete_exports(
            job_id=job_id, finished_before=self._clock() - RETENTION
        )
        return True

    async def close(self) -> None:
        """Stop the running jobs and drop the files not stored; the repository then says those
        jobs failed (not lost silently)."""
        if self._stop_listening is not None:
            await self._stop_listening()
            self._stop_listening = None
        unfinished = [j for j in self._jobs.values() if j.task is not None and not j.task.done()]
        for job in unfinished:
            assert job.task is not None
            job.task.cancel()
        await asyncio.gather(*(j.task for j in unfinished if j.task), return_exceptions=True)
        if unfinished:
            await self._repository.fail_exports(
                "the API replica holding the export stopped",
                self._clock(),
                job_ids=[j.job_id for j in unfinished],
            )


def _pieces(files: dict[str, bytes]) -> Iterator[tuple[str, int, memoryview]]:
    for resource_type, content in files.items():
        view = memoryview(content)
        for number, start in enumerate(range(0, len(content), FILE_PIECE)):
            yield resource_type, number, view[start : start + FILE_PIECE]
