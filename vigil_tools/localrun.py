"""``vigil run``: the whole pipeline on the local stack, fed by a simulated home-device fleet.

Starts the local stack, registers the simulated fleet (one care team whose on-call address is
``oncall@vigil.local``) and the pipeline heartbeat (a technical care team ``team-tech`` paged at
``tech-oncall@vigil.local``, its pseudo-patient and the heartbeat device), starts ingest, rules,
notify (with its API, so the acknowledgement link in every page answers), the care-team API (with
the stack's broker accounts, so device registration works) and the heartbeat publisher as
separate processes, then runs the simulator until Ctrl-C, printing each page notify records. The
pages themselves are e-mails caught by the stack's SMTP sink as ``.eml`` files in
``<data_dir>/mail``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)
from vigil.runtime import configure_logging
from vigil_tools.simulator.publisher import run as run_simulator
from vigil_tools.simulator.registry import fleet_registry
from vigil_tools.simulator.settings import SimulatorSettings

CARE_TEAM_ID = "team-sim"
ONCALL_EMAIL = "oncall@vigil.local"
SERVICES = ("ingest", "rules", "notify", "api", "heartbeat")
DEMO_USER = "oncall-nurse"

# The pipeline self-watch: notify pages this team when the heartbeat stops arriving.
TECH_TEAM_ID = "team-tech"
TECH_ONCALL_EMAIL = "tech-oncall@vigil.local"
HEARTBEAT_DEVICE_ID = "heartbeat-pipeline"
HEARTBEAT_PATIENT_ID = f"pipeline-{TECH_TEAM_ID}"
# The registry knows two device kinds; the heartbeat device is registered as a thermometer
# (it sends no temperature: its channel and schema are its own) rather than widen the kinds.
HEARTBEAT_DEVICE_KIND = "thermometer"
HEARTBEAT_DEVICE_MODEL = "vigil-heartbeat"
# Since when the heartbeat device is bound: far enough back for any clock it may have.
HEARTBEAT_BOUND_FROM = datetime(2000, 1, 1, tzinfo=UTC)


async def register_heartbeat(
    dsn: str,
    *,
    care_team_id: str = TECH_TEAM_ID,
    oncall_email: str = TECH_ONCALL_EMAIL,
    device_id: str = HEARTBEAT_DEVICE_ID,
) -> None:
    """The technical care team, its pseudo-patient and the heartbeat device bound to it, so the
    heartbeat passes ingest's registry and binding checks exactly as a device's message does.
    Idempotent; ``vigil register-heartbeat`` runs it for a deployment."""
    patient_id = f"pipeline-{care_team_id}"
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await upsert_care_team(conn, care_team_id, "Technical on-call (pipeline)", oncall_email)
            await upsert_patient(conn, patient_id, care_team_id)
            await upsert_device(conn, device_id, HEARTBEAT_DEVICE_KIND, HEARTBEAT_DEVICE_MODEL)
            await bind_device(conn, device_id, patient_id, HEARTBEAT_BOUND_FROM)
    finally:
        await conn.close()


def register_heartbeat_main(argv: list[str] | None = None) -> int:
    """``vigil register-heartbeat``: the registry entries of a deployment's heartbeat device."""
    parser = argparse.ArgumentParser(
        prog="vigil register-heartbeat",
        description="Register the technical care team, its pseudo-patient and the heartbeat "
        "device bound to it in VIGIL_PG_DSN (idempotent).",
    )
    parser.add_argument("--care-team-id", default=TECH_TEAM_ID)
    parser.add_argument("--oncall-email", required=True, help="the technical on-call address")
    parser.add_argument("--device-id", default=HEARTBEAT_DEVICE_ID)
    args = parser.parse_args(argv)
    from vigil.settings import PostgresSettings

    asyncio.run(
        register_heartbeat(
            PostgresSettings().dsn,
            care_team_id=args.care_team_id,
            oncall_email=args.oncall_email,
            device_id=args.device_id,
        )
    )
    print(f"heartbeat device {args.device_id} bound to care team {args.care_team_id}")
    return 0


def heartbeat_env(env: dict[str, str]) -> dict[str, str]:
    """What the heartbeat publisher and notify need on the local stack: the publisher speaks as
    the stack's gateway account (``vigil-sim`` may write under any device's topics), notify
    watches the heartbeat device and pages the technical team."""
    return {
        "VIGIL_HEARTBEAT_DEVICE_ID": HEARTBEAT_DEVICE_ID,
        "VIGIL_HEARTBEAT_MQTT_USERNAME": env["VIGIL_SIM_MQTT_USERNAME"],
        "VIGIL_HEARTBEAT_MQTT_PASSWORD": env["VIGIL_SIM_MQTT_PASSWORD"],
        "VIGIL_NOTIFY_TECHNICAL_CARE_TEAM_ID": TECH_TEAM_ID,
        # pydantic-settings reads a list from JSON.
        "VIGIL_NOTIFY_HEARTBEAT_SOURCES": f'["{HEARTBEAT_DEVICE_ID}"]',
    }


async def register_fleet(dsn: str, patients: int) -> None:
    registry = fleet_registry(
        patients, CARE_TEAM_ID, ONCALL_EMAIL, care_team_name="Simulated oncology team"
    )
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            team = registry.care_team
            await upsert_care_team(conn, team.care_team_id, team.name, team.oncall_email)
            for patient in registry.patients:
                await upsert_patient(
                    conn, patient.patient_id, patient.care_team_id, patient.weight_kg
                )
            for device in registry.devices:
                await upsert_device(conn, device.device_id, device.kind, device.model)
            for binding in registry.bindings:
                await bind_device(conn, binding.device_id, binding.patient_id, binding.valid_from)
    finally:
        await conn.close()


async def register_demo_user(dsn: str, data_dir: Path) -> str:
    """A clinician login for the dashboard; its password is generated once and kept locally."""
    import secrets

    from services.api.adapters.credentials import hash_password
    from services.api.adapters.repository import ApiRepository
    from services.api.domain.access import Role

    password_file = data_dir / "dashboard-password"
    if not password_file.exists():
        password_file.write_text(secrets.token_urlsafe(12) + "\n")
        password_file.chmod(0o600)
    password = password_file.read_text().strip()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        await ApiRepository(pool).create_user(
            "u-demo-nurse",
            DEMO_USER,
            "On-call nurse (demo)",
            hash_password(password),
            Role.CHARGE_NURSE,
            [CARE_TEAM_ID],
        )
    finally:
        await pool.close()
    return password


def notify_api_env(environ: dict[str, str]) -> dict[str, str]:
    """Notify's API for the local run: served on ``VIGIL_NOTIFY_API_PORT`` (8085), the address
    the acknowledgement links in pages point to (and Twilio's webhooks would). What the caller's
    environment already sets is kept."""
    port = environ.get("VIGIL_NOTIFY_API_PORT", "8085")
    wanted = {
        "VIGIL_NOTIFY_API_ENABLED": "true",
        "VIGIL_NOTIFY_API_PORT": port,
        "VIGIL_NOTIFY_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
    }
    return {name: environ.get(name, value) for name, value in wanted.items()}


async def _watch_pages(dsn: str, since: datetime, mail_dir: Path, stop: asyncio.Event) -> None:
    """Print one line per page recorded since the run started."""
    seen: set[str] = set()
    conn = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            rows = await conn.fetch(
                """
                SELECT p.page_id, p.created_at, p.patient_id, p.recipient, p.status,
                       a.title, a.priority, a.phase
                FROM pages p JOIN alerts a USING (alert_id)
                WHERE p.created_at >= $1 ORDER BY p.created_at
                """,
                since,
            )
            for row in rows:
                key = str(row["page_id"])
                if key in seen:
                    continue
                seen.add(key)
                print(
                    f"PAGE {row['created_at']:%H:%M:%S} {row['priority'].upper():<6} "
                    f"{row['phase']:<8} {row['patient_id']}: {row['title']} -> "
                    f"{row['recipient']} [{row['status']}]  (e-mails in {mail_dir})",
                    flush=True,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vigil run", description=__doc__)
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--scenario", default="fever:1,occlusion:1,normal:rest")
    parser.add_argument(
        "--interval", type=float, default=5.0, help="seconds between one device's readings"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="stop after this many seconds (default: until Ctrl-C)",
    )
    args = parser.parse_args(argv)

    from vigil_tools.stack import StackSettings, stack_env, up

    stack = StackSettings()
    print(f"vigil run: starting the local stack in {stack.data_dir} ...", flush=True)
    up(stack)
    env = stack_env(stack)
    os.environ.update(env)
    dsn = env["VIGIL_PG_DSN"]
    asyncio.run(register_fleet(dsn, args.patients))
    asyncio.run(register_heartbeat(dsn))
    for name, value in heartbeat_env(env).items():
        os.environ.setdefault(name, value)
    data_dir = Path(stack.data_dir)
    password = asyncio.run(register_demo_user(dsn, data_dir))
    api_port = os.environ.setdefault("VIGIL_API_PORT", "8080")
    os.environ.update(notify_api_env(dict(os.environ)))

    log_dir = Path(stack.data_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    processes: dict[str, subprocess.Popen[bytes]] = {}
    for name in SERVICES:
        log_file = (log_dir / f"{name}.log").open("ab")
        # The API gets the stack's broker accounts (vigil_tools.local_api), so registering a
        # device from the dashboard creates an account it can connect with.
        command = ["vigil_tools.local_api"] if name == "api" else ["vigil_tools.cli", name]
        processes[name] = subprocess.Popen(
            [sys.executable, "-m", *command],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
    print(
        f"vigil run: ingest, rules, notify, api, heartbeat started (logs in {log_dir}); "
        f"a silent pipeline pages {TECH_ONCALL_EMAIL}",
        flush=True,
    )
    print(
        f"vigil run: dashboard at http://127.0.0.1:{api_port}/ "
        f"(user {DEMO_USER}, password {password}, also in {data_dir / 'dashboard-password'})",
        flush=True,
    )
    print(
        f"vigil run: notify's API at {os.environ['VIGIL_NOTIFY_PUBLIC_BASE_URL']} "
        "(the acknowledgement links in pages)",
        flush=True,
    )
    configure_logging("WARNING")
    sim_settings = SimulatorSettings(
        patients=args.patients,
        scenario=args.scenario,
        interval_s=args.interval,
        duration_s=args.duration,
    )
    mail_dir = Path(stack.data_dir) / "mail"
    print(
        f"vigil run: simulating {args.patients} patients ({args.scenario}); pages appear below "
        f"and as e-mails in {mail_dir}. Ctrl-C stops the services; "
        "`vigil stack down` stops the stack.",
        flush=True,
    )

    async def session() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watcher = asyncio.create_task(_watch_pages(dsn, datetime.now(UTC), mail_dir, stop))
        try:
            counts = await run_simulator(sim_settings, stop)
            print(f"vigil run: simulator finished: {counts}", flush=True)
            if args.duration is not None:
                await asyncio.sleep(3)  # let the last readings travel through
        finally:
            stop.set()
            await watcher

    try:
        asyncio.run(session())
    finally:
        for process in processes.values():
            process.terminate()
        for name, process in processes.items():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
            if process.returncode not in (0, -signal.SIGTERM):
                print(
                    f"vigil run: {name} exited with {process.returncode}; see {log_dir}",
                    file=sys.stderr,
                )
    return 0


def pages_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vigil pages", description="Recent pages, newest last.")
    parser.add_argument("--limit", type=int, default=20)
    args = parser.parse_args(argv)
    from vigil_tools.stack import StackSettings, stack_env

    dsn = os.environ.get("VIGIL_PG_DSN") or stack_env(StackSettings())["VIGIL_PG_DSN"]

    async def show() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                """
                SELECT * FROM (
                    SELECT p.created_at, p.patient_id, p.recipient, p.status, a.title,
                           a.priority, a.phase, a.device_time
                    FROM pages p JOIN alerts a USING (alert_id)
                    ORDER BY p.created_at DESC LIMIT $1) recent
                ORDER BY created_at
                """,
                args.limit,
            )
        finally:
            await conn.close()
        for row in rows:
            print(
                f"{row['created_at'].isoformat()}  {row['priority']:<6} {row['phase']:<8} "
                f"{row['patient_id']:<10} {row['title']}  -> {row['recipient']} "
                f"[{row['status']}]"
            )
        if not rows:
            print("no pages recorded")

    asyncio.run(show())
    return 0
