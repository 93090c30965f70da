"""Broker restarts against a real Mosquitto of the test's own (the stack's configuration, its own
directory and port; the shared test stack is not touched): a paced QoS 1 publisher with a
persistent session that resends after reconnecting, an ingest-like subscriber (MQTT 5 persistent
session, re-subscribing on every connection), and counts of published / acknowledged by the
broker / received. ``python -m tests.broker_faults`` runs the same faults longer and prints
the figures of docs/reliability.md."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.broker_faults as faults
from tests.broker_faults import Scenario, run_scenario

DIRECT = "vigil/v1/dev/#"
SHARED = "$share/vigil-ingest/vigil/v1/dev/#"


@pytest.fixture
def broker_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: pytest (in any concurrent session) keeps its base directory 0700,
    # and as root the broker drops to its own user, which must reach its directory.
    path = Path(tempfile.mkdtemp(prefix="vigil-broker-fault-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(broker_dir: Path, monkeypatch: pytest.MonkeyPatch, topic: str, **kw: object) -> dict:
    monkeypatch.setattr(faults, "SHARED_TOPIC", topic)
    result = run_scenario(broker_dir, Scenario(rate=100.0, **kw))  # type: ignore[arg-type]
    figures = result.as_json()
    print(figures)
    assert figures["published"] == figures["acked"] > 0, figures  # the run itself worked
    return figures


def test_graceful_restart_loses_no_acknowledged_message(
    broker_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = run(broker_dir, monkeypatch, DIRECT, fault="graceful", seconds=8.0)
    assert figures["lost_acked"] == 0, figures
    assert figures["received"] == figures["acked"]
    assert figures["resume_s"] is not None and figures["resume_s"] < 10


def test_restart_while_ingest_is_away_queues_for_it(
    broker_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ingest away for 12 s, the broker restarted (SIGTERM) meanwhile: its direct subscription
    was saved with its session, so everything published in between waits for it."""
    figures = run(
        broker_dir,
        monkeypatch,
        DIRECT,
        fault="offline-restart",
        seconds=16.0,
        subscriber_away_s=12.0,
    )
    assert figures["lost_acked"] == 0, figures
    assert figures["received"] == figures["acked"]


def test_sigkill_while_ingest_is_away_loses_at_most_the_last_seconds(
    broker_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL: the broker saves every second (1 to 2 s apart) and sends PUBACK before saving, so
    it can lose what it acknowledged since its last save, and nothing older: everything queued
    for the absent subscriber before that, and everything after the restart, arrives. (With the
    former save every 60 s, all queued since the last save was lost: docs/reliability.md.)"""
    figures = run(
        broker_dir,
        monkeypatch,
        DIRECT,
        fault="offline-sigkill",
        seconds=16.0,
        subscriber_away_s=12.0,
    )
    assert figures["lost_acked"] <= 250, figures  # 2.5 s at 100 messages a second
    if figures["lost_acked"]:
        newest, oldest = figures["lost_published_s_before_fault"]
        assert newest >= 0 and oldest <= 2.5, figures
    # What was queued and saved before the crash, and all after it, arrived.
    assert figures["received"] >= figures["acked"] - figures["lost_acked"] > 1000


def test_positive_control_a_shared_subscription_is_not_restored(
    broker_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The harness does see a loss: Mosquitto 2.0 does not save shared subscriptions, so what is
    published after a restart and before a share-group subscriber is back has no subscriber."""
    figures = run(
        broker_dir,
        monkeypatch,
        SHARED,
        fault="offline-restart",
        seconds=12.0,
        subscriber_away_s=8.0,
    )
    assert figures["lost_acked"] >= 300, figures  # about 7 s at 100 messages a second
