"""The alarm-burden classifier: ground truth and page headers in, counts out (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bench.alarm_burden_classify import Page, classify, kinds_for, rule_of
from vigil_tools.simulator.course import EventKind, TrueEvent

T0 = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)


def page(key: str, at: datetime, *, all_clear: bool = False, phase: str = "start") -> Page:
    return Page((key,), "end" if all_clear else phase, "high", all_clear, at)


def event(kind: EventKind, patient: str, start_h: float, end_h: float) -> TrueEvent:
    return TrueEvent(
        kind, patient, "dev", T0 + timedelta(hours=start_h), T0 + timedelta(hours=end_h)
    )


def test_rule_and_kinds_are_read_from_the_dedup_key() -> None:
    assert rule_of("P-1:fever:20250106T120000Z:fever_unobserved:20250106T123000Z") == (
        "fever_unobserved"
    )
    assert kinds_for("P-1:pump_alarm:pump-P-1:occlusion_downstream:x") == (EventKind.OCCLUSION,)
    assert kinds_for("P-1:pump_alarm:pump-P-1:battery_low:x") == (EventKind.LOW_BATTERY,)
    assert kinds_for("P-1:device_silent:pump-P-1:x") == ()
    assert kinds_for("P-1:bag_clock:pump-P-1:x") == (EventKind.BAG_AT_RISK,)
    assert EventKind.PUMP_STOP in kinds_for("P-1:interruption_clock:pump-P-1:x")
    # A rule the classifier does not know is judged by its device.
    assert kinds_for("P-1:new_rule:thermo-P-1:x") == (EventKind.FEVER, EventKind.BORDERLINE_FEVER)


def test_true_false_all_clear_night_and_recall() -> None:
    events = [
        event(EventKind.FEVER, "P-1", 0, 3),
        event(EventKind.OCCLUSION, "P-1", 10, 10.5),  # 22:00-22:30 UTC: a night event
        event(EventKind.OCCLUSION, "P-2", 1, 1.2),  # never paged
        event(EventKind.PUMP_STOP, "P-2", 5, 7),
        event(EventKind.DROPOUT, "P-2", 2, 3),  # not owed a page
    ]
    pages = [
        page("P-1:fever:a", T0 + timedelta(minutes=10)),  # true fever
        page("P-1:fever:a", T0 + timedelta(hours=3, minutes=5), all_clear=True),
        page("P-1:pump_alarm:pump-P-1:occlusion_downstream:b", T0 + timedelta(hours=10)),
        # An occlusion page 3 h after the occlusion ended: outside the grace, false.
        page(
            "P-1:pump_alarm:pump-P-1:occlusion_downstream:c", T0 + timedelta(hours=13, minutes=31)
        ),
        page("P-2:device_silent:pump-P-2:d", T0 + timedelta(hours=2, minutes=20)),  # false
        page("P-2:interruption_clock:pump-P-2:e", T0 + timedelta(hours=5, minutes=30)),
        page("pipeline:silent:heartbeat:f", T0),  # not a patient of the course
        # A bundle: true when one of its alerts is.
        Page(
            ("P-2:bag_clock:pump-P-2:g", "P-2:interruption_clock:pump-P-2:h"),
            "start",
            "medium",
            False,
            T0 + timedelta(hours=6),
        ),
    ]
    figures = classify(events, pages, patients=["P-1", "P-2"], days=1.0, zone="UTC")
    assert figures["emails"] == 7
    assert figures["pages"] == 6
    assert figures["other_pages"] == 1
    assert figures["all_clears"] == 1
    assert figures["true_pages"] == 4
    assert figures["false_pages"] == 2
    assert figures["true_pages_by_kind"] == {"fever": 1, "occlusion": 1, "pump_stop": 2}
    # 22:00 and 01:31 UTC are night; 12:00-18:00 are not.
    assert figures["night_pages"] == 2
    assert figures["night_all_clears"] == 0
    assert figures["false_pages_per_patient_day"] == 1.0
    assert figures["pages_per_patient_day"] == 3.0
    assert figures["emails_per_patient_day"] == 3.5
    assert figures["recall"]["fever"] == {"events": 1, "paged": 1, "recall": 1.0}
    assert figures["recall"]["occlusion"] == {"events": 2, "paged": 1, "recall": 0.5}
    assert figures["recall"]["pump_stop"]["recall"] == 1.0
    assert figures["recall"]["low_battery"]["recall"] is None
    assert figures["by_rule"]["device_silent"] == {"false": 1}
    assert figures["by_rule"]["bag_clock+interruption_clock"] == {"true": 1}


def test_night_is_counted_in_the_homes_zone() -> None:
    # 21:30 UTC is 22:30 in Berlin (winter): a night page there, not in UTC.
    at = datetime(2025, 1, 6, 21, 30, tzinfo=UTC)
    pages = [page("P-1:device_silent:thermo-P-1:x", at)]
    berlin = classify([], pages, patients=["P-1"], days=1, zone="Europe/Berlin")
    utc = classify([], pages, patients=["P-1"], days=1, zone="UTC")
    assert (berlin["night_pages"], utc["night_pages"]) == (1, 0)


def test_an_all_clear_at_night_is_counted_apart_from_night_pages() -> None:
    # All clears are information, not pages: a night's start and all clear are one night page
    # and one night all clear.
    night = datetime(2025, 1, 6, 23, 0, tzinfo=UTC)
    pages = [
        page("P-1:pump_alarm:pump-P-1:occlusion_downstream:x", night),
        page("P-1:pump_alarm:pump-P-1:occlusion_downstream:x", night, all_clear=True),
        page("P-1:fever:y", night.replace(hour=12), all_clear=True),  # by day: neither
    ]
    figures = classify([], pages, patients=["P-1"], days=1, zone="UTC")
    assert (figures["night_pages"], figures["night_all_clears"]) == (1, 1)
    assert figures["night_all_clears_per_patient_night"] == 1.0
    assert figures["all_clears"] == 2


def test_page_is_read_from_the_e_mail_headers() -> None:
    parsed = Page.from_headers(
        {
            "Date": "Mon, 06 Jan 2025 12:09:00 +0000",
            "X-Vigil-Dedup-Key": "P-1:bag_clock:pump-P-1:a, P-1:fever:b",
            "X-Vigil-Phase": "end",
            "X-Vigil-Priority": "info",
            "X-Vigil-All-Clear": "yes",
        }
    )
    assert parsed.dedup_keys == ("P-1:bag_clock:pump-P-1:a", "P-1:fever:b")
    assert parsed.all_clear and parsed.phase == "end" and not parsed.repeat
    assert parsed.sent_at == datetime(2025, 1, 6, 12, 9, tzinfo=UTC)


def test_a_borderline_fever_is_owed_nothing_and_its_page_is_not_false() -> None:
    """A fever within the thermometers' error of the definition: a fever page during it is a
    true page (the readings may have met the definition), its absence is no miss (recall counts
    owed fevers only), and both are counted apart."""
    events = [
        event(EventKind.BORDERLINE_FEVER, "P-1", 0, 3),
        event(EventKind.BORDERLINE_FEVER, "P-2", 0, 3),
        event(EventKind.FEVER, "P-2", 10, 12),
    ]
    pages = [
        page("P-1:fever:a", T0 + timedelta(minutes=70)),
        page("P-2:fever:b", T0 + timedelta(hours=10, minutes=5)),
        # Outside every window of P-1: false, as for any fever page.
        page("P-1:fever:c", T0 + timedelta(hours=8)),
    ]
    figures = classify(events, pages, patients=["P-1", "P-2"], days=1.0, zone="UTC")
    assert figures["true_pages"] == 2 and figures["false_pages"] == 1
    assert figures["true_pages_by_kind"] == {"borderline_fever": 1, "fever": 1}
    assert figures["recall"]["fever"] == {"events": 1, "paged": 1, "recall": 1.0}
    assert figures["borderline_fevers"] == {"events": 2, "paged": 1}
