"""Storage settings and the TimescaleDB build script's guards (no database, no build)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vigil.db.migrate import MigrationError, apply_migrations, migration_names
from vigil.db.storage import MIN_RETENTION_DAYS, StorageSettings

BUILD = Path(__file__).resolve().parents[2] / "deploy" / "timescaledb" / "build.sh"


def test_the_defaults_keep_readings_and_compress_after_a_week(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("COMPRESS_AFTER_DAYS", "READINGS_RETENTION_DAYS"):
        monkeypatch.delenv(f"VIGIL_STORAGE_{name}", raising=False)
    settings = StorageSettings()
    assert (settings.compress_after_days, settings.readings_retention_days) == (7, 0)


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIGIL_STORAGE_READINGS_RETENTION_DAYS", "730")
    monkeypatch.setenv("VIGIL_STORAGE_COMPRESS_AFTER_DAYS", "2")
    settings = StorageSettings()
    assert (settings.compress_after_days, settings.readings_retention_days) == (2, 730)


def test_a_retention_shorter_than_a_course_and_its_review_is_refused() -> None:
    with pytest.raises(ValueError, match=f"{MIN_RETENTION_DAYS} days"):
        StorageSettings(readings_retention_days=28)
    with pytest.raises(ValueError, match="exceed"):
        StorageSettings(readings_retention_days=40, compress_after_days=40)
    assert StorageSettings(readings_retention_days=MIN_RETENTION_DAYS).readings_retention_days


def test_the_timescaledb_migrations_come_after_every_file_they_repair() -> None:
    names = migration_names()
    assert names == sorted(names)
    assert names.index("0012_timescaledb_compression.sql") > names.index("0003_ingest.sql")


async def test_an_unknown_target_migration_is_refused_before_connecting() -> None:
    with pytest.raises(MigrationError, match="no migration named"):
        await apply_migrations("postgresql://nobody@127.0.0.1:1/none", upto="9999_nothing.sql")


def fake_source(tmp_path: Path, version: str) -> Path:
    source = tmp_path / f"timescaledb-{version}"
    source.mkdir()
    (source / "version.config").write_text(f"version = {version}\nprevious_version = 0\n")
    (source / "CMakeLists.txt").write_text("")
    return source


def run_build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(BUILD), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_build_script_wants_a_postgresql_15_release(tmp_path: Path) -> None:
    done = run_build(str(fake_source(tmp_path, "2.29.0")), str(tmp_path / "pg"))
    assert done.returncode == 1
    assert "needs 2.28.x" in done.stderr
    assert not (tmp_path / "pg").exists()


@pytest.mark.skipif(
    not Path("/usr/lib/postgresql/15/bin/pg_config").exists(), reason="no PostgreSQL 15"
)
@pytest.mark.parametrize("prefix", ["/usr", "/usr/local/pg"])
def test_the_build_script_never_installs_into_the_system_postgresql(
    tmp_path: Path, prefix: str
) -> None:
    done = run_build(str(fake_source(tmp_path, "2.28.3")), prefix)
    assert done.returncode == 1
    assert "refusing" in done.stderr or "server headers" in done.stderr


def test_a_timescaledb_stack_has_worker_processes_for_its_jobs(tmp_path: Path) -> None:
    """TimescaleDB's guidance: worker processes >= its background workers + parallel workers
    (8) + 3; the plain stack keeps PostgreSQL's defaults."""
    from vigil_tools.stack import postgres
    from vigil_tools.stack.settings import StackSettings

    settings = StackSettings(data_dir=tmp_path / "stack", repo_root=BUILD.parents[2])
    conf = postgres.render_postgresql_conf(settings, timescaledb=True)
    values = dict(
        line.split(" = ", 1) for line in conf.splitlines() if " = " in line and line[0] != "#"
    )
    workers = int(values["max_worker_processes"])
    assert workers >= int(values["timescaledb.max_background_workers"]) + 8 + 3
    plain = postgres.render_postgresql_conf(settings, timescaledb=False)
    assert "max_worker_processes" not in plain
    assert not [line for line in plain.splitlines() if line.startswith("timescaledb.")]
