"""Benchmark of the rules service's config reload: what one reload costs the service's event
loop, at fleet sizes, when nothing changed (the every-few-seconds case) and when it did.

``make bench-config-reload`` (or ``python bench/config_reload.py`` with ``VIGIL_STACK_*`` set).
Registers ``--patients`` patients per step (a cycle each, an override for one in ten) in a care
team of its own, then for each fleet size measures, in the same process:

- ``build_ms``: a one-shot load (``load_rules_config``: read the rows, build, validate and
  record the config), the baseline; its ``build_cpu_ms`` is this process's CPU time, which is
  time the rules service's event loop cannot page anyone.
- ``unchanged_ms`` / ``unchanged_cpu_ms``: a reload through ``RulesConfigSource`` when the rows
  did not change (best of five): the digest query only.
- ``compile_ms``: compiling every patient's rules with a ``RulesCompiler``, as the service
  does once per changed config (``ConfigWatch.check_once``; the engines then reuse the result);
  ``compile_each_ms``: the same patients compiled one by one with ``RulesConfig.compile_for``
  (what the service did before the compiler; each also compiled again in its engine), the
  baseline of ``compile_vs_each``.
- ``change_stall_ms``: the longest the event loop went without running a 1 ms ticker while a
  changed config was loaded (``RulesConfigSource.load``: read, build, record) and compiled (as
  ``ConfigWatch.check_once`` does), both of which run their CPU work in a worker thread;
  ``change_stall_on_loop_ms``: the same build and compile from the same rows run on the loop
  itself, the baseline of ``stall_vs_on_loop`` (this is how long no alert could be decided).

ONE JSON line of figures goes to stdout at the end; nothing asserts a speed. The rows it wrote
are deleted at the end (the recorded configs and their audit entries stay, as the log is
append-only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import asyncpg

from bench.common import stack_environment
from services.rules.adapters.config_store import RulesConfigSource, load_rules_config
from services.rules.domain.config import RulesCompiler, Thresholds


async def add_patients(conn: asyncpg.Connection, team: str, names: list[str]) -> None:
    await conn.executemany(
        "INSERT INTO patients (patient_id, care_team_id, weight_kg) VALUES ($1, $2, 20.0)",
        [(name, team) for name in names],
    )
    await conn.executemany(
        "INSERT INTO patient_cycles (patient_id, cycle_start, step_up_day) VALUES ($1, $2, 8)",
        [(name, datetime(2026, 11, 1, tzinfo=UTC)) for name in names],
    )
    await conn.executemany(
        "INSERT INTO patient_rule_overrides (patient_id, version, overrides, signed_off_by, "
        "signed_off_at) VALUES ($1, 1, '{\"fever_single_c\": 38.5}'::jsonb, 'bench', now())",
        [(name,) for name in names[::10]],
    )


async def loop_stall_ms(work: Callable[[], Awaitable[object]]) -> float:
    """The longest gap, in ms, between two runs of a ticker that asks for the loop every 1 ms,
    while ``work`` runs."""
    worst = 0.0
    running = True

    async def tick() -> None:
        nonlocal worst
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.02)
    worst = 0.0
    try:
        await work()
    finally:
        running = False
        await ticker
    return worst * 1000


async def measure_stalls(conn: asyncpg.Connection) -> dict[str, float]:
    source = RulesConfigSource(Thresholds(), allowed_lateness_s=60)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        _, rows = await source._read(conn)
    assert rows is not None

    async def on_loop() -> None:
        config, _ = source._build_with_text(*rows)
        RulesCompiler(config).compile_profiles()

    async def as_the_service_does() -> None:
        # A source of its own remembers nothing: the load reads, builds and records.
        fresh = RulesConfigSource(Thresholds(), allowed_lateness_s=60)
        config = await fresh.load(conn)
        await asyncio.to_thread(RulesCompiler(config).compile_profiles)

    on_loop_ms = min([await loop_stall_ms(on_loop) for _ in range(3)])
    threaded_ms = min([await loop_stall_ms(as_the_service_does) for _ in range(3)])
    return {"change_stall_ms": threaded_ms, "change_stall_on_loop_ms": on_loop_ms}


async def measure(conn: asyncpg.Connection) -> dict[str, float]:
    started, cpu = time.perf_counter(), time.process_time()
    config = await load_rules_config(conn, Thresholds(), allowed_lateness_s=60)
    figures = {
        "build_ms": (time.perf_counter() - started) * 1000,
        "build_cpu_ms": (time.process_time() - cpu) * 1000,
    }
    source = RulesConfigSource(Thresholds(), allowed_lateness_s=60)
    await source.load(conn)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(5):
        started, cpu = time.perf_counter(), time.process_time()
        assert (await source.load(conn)).config_version == config.config_version
        best = min(best, time.perf_counter() - started)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    assert source.skipped == 5
    figures["unchanged_ms"] = best * 1000
    figures["unchanged_cpu_ms"] = best_cpu * 1000
    started = time.perf_counter()
    each = [config.compile_for(patient_id) for patient_id in config.profiles]
    figures["compile_each_ms"] = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    compiler = RulesCompiler(config)
    shared = [compiler.rules_for(patient_id) for patient_id in config.profiles]
    figures["compile_ms"] = (time.perf_counter() - started) * 1000
    assert shared == each  # the same rules, however they are compiled
    figures.update(await measure_stalls(conn))
    figures["patients"] = len(config.profiles)
    return {key: round(value, 1) for key, value in figures.items()}


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    env = stack_environment()
    conn = await asyncpg.connect(env["VIGIL_PG_DSN"])
    run = uuid.uuid4().hex[:8]
    team = f"bench-reload-{run}"
    names: list[str] = []
    steps = []
    try:
        await conn.execute(
            "INSERT INTO care_teams (care_team_id, name, oncall_email) "
            "VALUES ($1, $1, 'bench@example.org')",
            team,
        )
        for _ in range(args.steps):
            new = [f"{team}-{n}" for n in range(len(names), len(names) + args.patients)]
            await add_patients(conn, team, new)
            names += new
            steps.append(await measure(conn))
            print(f"{steps[-1]}", file=sys.stderr, flush=True)
    finally:
        for table in ("patient_cycles", "patient_rule_overrides", "patients"):
            await conn.execute(f"DELETE FROM {table} WHERE patient_id = ANY($1)", names)
        await conn.execute("DELETE FROM care_teams WHERE care_team_id = $1", team)
        await conn.close()
    last = steps[-1]
    return {
        "bench": "config_reload",
        "steps": steps,
        "unchanged_vs_build_cpu": round(
            last["unchanged_cpu_ms"] / max(last["build_cpu_ms"], 0.1), 4
        ),
        "compile_vs_each": round(last["compile_ms"] / max(last["compile_each_ms"], 0.1), 4),
        "stall_vs_on_loop": round(
            last["change_stall_ms"] / max(last["change_stall_on_loop_ms"], 0.1), 4
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=2_500, help="patients added per step")
    parser.add_argument("--steps", type=int, default=3, help="fleet sizes measured")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
