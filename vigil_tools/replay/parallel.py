"""Sharing one replay among worker processes, lane by lane.

The rules service runs one engine per telemetry partition, and a replay lays its engines out
the same way (``PinnedRules.lane_of``): no event of one lane moves the state or the clock of
another. A replay can therefore read and decide its lanes in separate processes and add up
what they decided, with the same alerts, in the same order (``Replay.order_alerts``), as one
process reading them all. That is what makes a long replay use the machine's cores: reading a
record and deciding on it is Python work, one core per process.

Workers are forked, not spawned: they start in milliseconds with the parent's modules and its
pinned config already loaded, and each opens its own connections (nothing of the parent's is
used in a child, which leaves with ``os._exit`` and so closes nothing of the parent's either).
One share runs in the parent itself, on its own connection or consumer, while the workers run
theirs: it needs no fork, no connection and no trip back through a pipe.
Where ``fork`` does not exist the replay runs in one process. A worker sends its progress and
then its result (or its error) back through a pipe; a worker that dies without a word fails the
replay with its exit code, never a silently partial result.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import threading
import traceback
from collections.abc import Callable, Coroutine, Hashable, Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any, TypeVar

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

#: A worker's job: given a progress callback (events read since the last call), read its
#: share of the stream and return what it decided (picklable).
Job = Callable[[Callable[[int], None]], Coroutine[Any, Any, T]]


#: Generation thresholds while a replay runs (the interpreter's default is 700, 10, 10).
REPLAY_GC_THRESHOLDS = (200_000, 50, 50)


class WorkerFailed(RuntimeError):
    """A worker process raised, or died; the message carries its traceback or exit code."""


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def default_workers() -> int:
    """One worker per core the process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not every platform has affinity
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def tuned_collector() -> Iterator[None]:
    """For the length of a replay: the objects that exist already are frozen out of the
    collector's passes, and young objects are collected less often. A replay allocates an event
    per record and keeps few of them; with the default thresholds the cyclic collector walked
    the whole heap so often that it cost a third of a replay's time (measured with
    ``bench/replay.py``). Both settings are restored on the way out, by the outermost of
    overlapping replays in one process."""
    _tuned[0] += 1
    if _tuned[0] == 1:
        _tuned[1] = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(*REPLAY_GC_THRESHOLDS)
    try:
        yield
    finally:
        _tuned[0] -= 1
        if _tuned[0] == 0:
            gc.set_threshold(*_tuned[1])
            gc.unfreeze()


# Replays running in this process now, and the thresholds they found.
_tuned: list[Any] = [0, gc.get_threshold()]


def split_lanes(weights: Mapping[K, int], shares: int) -> list[list[K]]:
    """Deal lanes to at most ``shares`` groups with about equal total weight, heaviest group
    first (the first share runs in the parent, which starts it soonest). Lanes of weight 0 are
    left out; no group is empty. Pure and deterministic: ties keep the lanes' sorted order.

    Lanes are dealt largest first, each to the lightest group. Two groups of few lanes (one
    worker per core on two cores, a topic's partitions as lanes) are then split exactly when
    that is more even, since a replay takes as long as its largest share: for 20 patients of
    equal weight on 6 lanes, dealing alone left 11 patients in one share for 26 % of random
    sets of patient ids, the exact split for about 7 % (those have no 10-10 split at all)."""
    lanes = sorted((k for k, w in weights.items() if w > 0), key=lambda k: (-weights[k], str(k)))
    count = max(1, min(shares, len(lanes)))
    groups: list[list[K]] = [[] for _ in range(count)]
    totals = [0] * count
    for lane in lanes:
        lightest = min(range(count), key=lambda g: (totals[g], g))
        groups[lightest].append(lane)
        totals[lightest] += weights[lane]
    if count == 2 and len(lanes) <= EXACT_SPLIT_MAX_LANES:
        light_total, mask = _lightest_half(lanes, weights)
        if max(totals) > sum(totals) - light_total:
            light = [lane for n, lane in enumerate(lanes) if mask >> n & 1]
            heavy = [lane for n, lane in enumerate(lanes) if not mask >> n & 1]
            groups = [heavy, light]
    # Heaviest first; a stable sort keeps the dealt order of equal groups.
    return sorted((g for g in groups if g), key=lambda g: -sum(weights[lane] for lane in g))


#: Up to how many lanes two shares are split exactly (``_lightest_half`` keeps one subset per
#: reachable total: at most 2**12 of them, about a millisecond).
EXACT_SPLIT_MAX_LANES = 12


def _lightest_half(lanes: Sequence[K], weights: Mapping[K, int]) -> tuple[int, int]:
    """The subset of ``lanes`` (as a bit mask of their indexes) whose total weight is the
    largest not above half of all of them, and that total: with the rest as the other share,
    the split whose heavier share is lightest."""
    half = sum(weights[lane] for lane in lanes) // 2
    reachable: dict[int, int] = {0: 0}
    for n, lane in enumerate(lanes):
        weight = weights[lane]
        for total, mask in list(reachable.items()):
            if total + weight <= half:
                # The first subset found for a total is kept: the same lanes on every run.
                reachable.setdefault(total + weight, mask | 1 << n)
    best = max(reachable)
    return best, reachable[best]


#: How many bytes a worker's pipe holds (Linux lets a process raise it to
#: ``/proc/sys/fs/pipe-max-size``, 1 MiB by default): a worker's whole result, which is then
#: written at once and read in one go. Through the default 64 KiB the parent's reading thread
#: takes it piece by piece, each piece waiting for the interpreter lock while the parent
#: replays its own share (measured: 14-16 ms after that share ended, in 2 of 6 runs).
WORKER_PIPE_BYTES = 1 << 20


def _widen(pipe: Connection) -> None:
    """Ask for a ``WORKER_PIPE_BYTES`` pipe buffer where the platform allows it; a refusal
    leaves the default (the result still arrives whole, only later)."""
    import fcntl  # POSIX only, as ``fork`` is: imported where workers are forked

    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
    if set_size is None:
        return
    with contextlib.suppress(OSError):
        fcntl.fcntl(pipe.fileno(), set_size, WORKER_PIPE_BYTES)


def _child(job: Job[Any], out: Connection) -> None:
    """A forked worker: a fresh event loop runs the job; everything goes back through ``out``."""
    # The fork copied the parent's "running loop" marker (Python 3.12 clears it at fork
    # itself); this process has no loop running until asyncio.run starts one.
    asyncio.events._set_running_loop(None)
    try:
        result: Any = asyncio.run(job(lambda n: out.send(("progress", n))))
        out.send(("done", result))
    except BaseException as error:  # every failure must reach the parent
        out.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        out.close()


def _drain(pipe: Connection, on_progress: Callable[[int], None]) -> tuple[str, Any] | None:
    """Read one worker's messages until its result or its error (None: it ended first)."""
    try:
        while True:
            kind, value = pipe.recv()
            if kind != "progress":
                return kind, value
            on_progress(value)
    except EOFError:
        return None
    finally:
        pipe.close()


async def run_jobs(
    jobs: Sequence[Job[T]], on_progress: Callable[[int], None], *, here: Job[T] | None = None
) -> list[T]:
    """Run each job in a forked worker process, and ``here`` (if given) in this process, on
    the caller's loop, meanwhile; their results, ``here``'s first, then the jobs' in order.

    Running one share here spares it a fork, a connection and the trip of its result back
    through a pipe (the last share to finish is the replay's critical path).
    ``on_progress`` is called on the caller's loop. The first worker to fail or die raises
    ``WorkerFailed`` at once, and the others are stopped, as they are when ``here`` raises
    (its exception propagates) or the caller is cancelled; ``here`` is cancelled when a worker
    fails.
    """
    if not jobs and here is None:
        return []
    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context("fork")

    def progress(n: int) -> None:
        loop.call_soon_threadsafe(on_progress, n)

    processes = []
    pipes = []
    # The parent's objects go to the permanent generation before the forks, so the workers'
    # collections neither walk them nor touch (and copy) the pages they live on; the workers
    # inherit the collector's settings (see ``tuned_collector``). Every fork happens before
    # this process starts a thread of its own.
    gc.freeze()
    try:
        for job in jobs:
            receive, send = context.Pipe(duplex=False)
            _widen(send)
            process = context.Process(target=_child, args=(job, send), daemon=True)
            process.start()
            send.close()  # the child's end; EOF on ``receive`` then means the child is gone
            processes.append(process)
            pipes.append(receive)
    finally:
        gc.unfreeze()
    outcomes: list[asyncio.Future[tuple[str, Any] | None]] = [
        loop.create_future() for _ in processes
    ]

    def settle(future: asyncio.Future[tuple[str, Any] | None], outcome: Any) -> None:
        if not future.done():
            future.set_result(outcome)

    def read(index: int) -> None:
        outcome = _drain(pipes[index], progress)
        loop.call_soon_threadsafe(settle, outcomes[index], outcome)

    for index in range(len(processes)):
        threading.Thread(target=read, args=(index,), daemon=True).start()
    local: asyncio.Future[T] | None = (
        asyncio.ensure_future(here(on_progress)) if here is not None else None
    )
    try:
        pending: set[asyncio.Future[Any]] = set(outcomes)
        if local is not None:
            pending.add(local)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                if future is local:
                    future.result()  # raises what ``here`` raised
                    continue
                outcome = future.result()
                process = processes[outcomes.index(future)]
                if outcome is None:
                    await asyncio.to_thread(process.join, 5)
                    raise WorkerFailed(
                        f"replay worker {process.pid} ended with exit code "
                        f"{process.exitcode} and no result"
                    )
                if outcome[0] == "error":
                    raise WorkerFailed(f"replay worker {process.pid} failed: {outcome[1]}")
        for process in processes:
            await asyncio.to_thread(process.join)
        results: list[T] = [local.result()] if local is not None else []
        return results + [future.result()[1] for future in outcomes]  # type: ignore[index]
    finally:
        if local is not None and not local.done():
            local.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await local
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
