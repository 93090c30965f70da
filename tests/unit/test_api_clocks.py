"""The dashboard's infusion clocks: counted on the pump's clock, in the team's zone, named."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.api.domain.clocks import PumpReport, infusion_clocks, local_time

T0 = datetime(2025, 1, 15, 2, 0, tzinfo=UTC)


def test_bag_empty_is_predicted_on_the_pump_clock_from_its_newest_status() -> None:
    """30 mL at 10 mL/h at 03:00 CET: empty 06:00 CET by the pump's clock, as of that status."""
    clocks = infusion_clocks([PumpReport(T0, "running", 10.0, 30.0)])
    assert clocks.bag_empty_at == T0 + timedelta(hours=3)
    assert clocks.as_of == T0


def test_interruption_is_counted_up_to_the_newest_status_not_to_now() -> None:
    """Stopped at 02:00, still stopped at its newest status at 02:45: 45 min, whatever the
    server's clock says (a pump clock ahead or behind, or a status read hours later)."""
    reports = [
        PumpReport(T0 - timedelta(minutes=5), "running", 10.0, 100.0),
        PumpReport(T0, "stopped", 0.0, 100.0),
        PumpReport(T0 + timedelta(minutes=45), "stopped", 0.0, 100.0),
    ]
    clocks = infusion_clocks(reports)
    assert clocks.interrupted_for == timedelta(minutes=45)
    assert clocks.stopped_since == T0 and clocks.as_of == T0 + timedelta(minutes=45)


def test_no_reports_no_clocks() -> None:
    clocks = infusion_clocks([])
    assert clocks.bag_empty_at is None and clocks.interrupted_for is None and clocks.as_of is None


def test_local_time_names_the_zone() -> None:
    assert local_time(T0, "Europe/Berlin") == "15 Jan 03:00 (Europe/Berlin)"
    assert local_time(T0, "UTC") == "15 Jan 02:00 (UTC)"
    assert local_time(T0, "Not/AZone") == "15 Jan 02:00 (UTC)"


def test_local_time_with_seconds() -> None:
    assert (
        local_time(T0.replace(second=7), "Europe/Berlin", seconds=True)
        == "15 Jan 03:00:07 (Europe/Berlin)"
    )


def test_local_time_refuses_a_time_without_an_offset() -> None:
    with pytest.raises(ValueError, match="UTC offset"):
        local_time(datetime(2025, 1, 15, 2, 0), "Europe/Berlin")  # noqa: DTZ001
