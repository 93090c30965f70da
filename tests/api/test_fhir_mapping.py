"""The FHIR mapping and search parsing as pure functions: rows in, resources out, each resource
validated by the R4 models of ``fhir.resources`` (its R4B package), never by hand."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from services.api.domain import fhir
from services.api.domain.fhir_capability import capability_statement, export_manifest
from services.api.domain.fhir_search import SearchError, date_range, observation_kinds

AT = datetime(2026, 3, 1, 3, 0, tzinfo=UTC)


def validate(resource: dict[str, Any]) -> Any:
    """Parse the resource with the model of its type; raises on anything invalid. A Bundle's
    entries are parsed by the Bundle's own model."""
    model = get_fhir_model_class(resource["resourceType"])
    return model.model_validate(resource)


def reading(**changes: Any) -> dict[str, Any]:
    row = {
        "device_time": AT,
        "ingest_time": AT + timedelta(seconds=2),
        "patient_id": "P-1",
        "device_id": "thermo-1",
        "message_id": uuid.UUID(int=1),
        "value_c": 38.4,
        "original_value": 38.4,
        "original_unit": "C",
        "site": "axillary",
        "flags": [],
    }
    row.update(changes)
    return row


def episode(**changes: Any) -> dict[str, Any]:
    row = {
        "flag_id": uuid.UUID(int=7),
        "dedup_key": "P-1:fever:1",
        "patient_id": "P-1",
        "device_id": "thermo-1",
        "kind": "physiological",
        "code": "fever_single",
        "title": "Fever 38.4 °C",
        "priority": "high",
        "opened_at": AT,
        "cleared_at": None,
        "resolved_at": None,
        "acknowledged_by": None,
        "acknowledged_at": None,
        "evidence": [
            {"name": "temperature", "value": 38.4, "message_id": str(uuid.UUID(int=1))},
            {"name": "rate", "value": 10.0, "message_id": str(uuid.UUID(int=2))},
        ],
    }
    row.update(changes)
    return row


def page(**changes: Any) -> dict[str, Any]:
    row = {
        "page_id": uuid.UUID(int=11),
        "dedup_key": "P-1:fever:1",
        "patient_id": "P-1",
        "channel": "email",
        "recipient": "oncall@example.test",
        "recipient_ref": "person:nurse-1",
        "status": "sent",
        "purpose": "alert",
        "created_at": AT + timedelta(seconds=1),
        "next_attempt_at": None,
        "priority": "high",
        "title": "Fever 38.4 °C",
        "sent_at": AT + timedelta(seconds=2),
        "delivered_at": None,
        "last_detail": None,
    }
    row.update(changes)
    return row


def test_the_models_refuse_an_invalid_resource() -> None:
    """Control for every validation here: the models do refuse a broken resource (an
    Observation without its code, a Communication whose sent time is no dateTime). The models
    check structure, cardinality and data types; they do not check codes against value sets."""
    broken = fhir.temperature_observation(reading())
    del broken["code"]
    with pytest.raises(ValueError):
        validate(broken)
    wrong_time = fhir.page_communication(page(), None) | {"sent": "yesterday"}
    with pytest.raises(ValueError):
        validate(wrong_time)


def test_temperature_reading_is_a_body_temperature_observation() -> None:
    """LOINC 8310-5, UCUM Cel, device time as effective, ingest time as issued, the device and
    the site as body site and method."""
    resource = fhir.temperature_observation(reading())
    model = validate(resource)
    assert {(c.system, c.code) for c in model.code.coding} >= {("http://loinc.org", "8310-5")}
    assert (float(model.valueQuantity.value), model.valueQuantity.code) == (38.4, "Cel")
    assert model.valueQuantity.system == "http://unitsofmeasure.org"
    assert resource["effectiveDateTime"] == AT.isoformat()
    assert resource["issued"] == (AT + timedelta(seconds=2)).isoformat()
    assert model.device.reference == "Device/thermo-1"
    assert model.subject.reference == "Patient/P-1"
    assert model.bodySite.coding[0].code == "91470000"
    assert model.method.text == "Axillary thermometry"
    assert model.dataAbsentReason is None


def test_implausible_reading_has_no_value_but_a_data_absent_reason() -> None:
    """A sensor fault is never charted as a temperature: no value, dataAbsentReason error, the
    number sent kept in a note and the flag as a tag. Control: the same reading unflagged has
    its value."""
    flagged = fhir.temperature_observation(
        reading(value_c=25.0, original_value=25.0, flags=["implausible_temperature"])
    )
    validate(flagged)
    assert "valueQuantity" not in flagged
    assert flagged["dataAbsentReason"]["coding"][0]["code"] == "error"
    assert "25.0" in flagged["note"][0]["text"]
    assert flagged["meta"]["tag"] == [
        {"system": fhir.INGEST_FLAGS, "code": "implausible_temperature"}
    ]
    plain = fhir.temperature_observation(reading(value_c=25.0, original_value=25.0))
    assert plain["valueQuantity"]["value"] == 25.0 and "dataAbsentReason" not in plain


def test_fahrenheit_and_clock_flags_are_kept_as_notes() -> None:
    """A reading sent in °F is charted in Cel with the number sent in a note; a device clock
    out of bounds is a tag and a note saying the effective time may be wrong."""
    resource = fhir.temperature_observation(
        reading(value_c=38.5, original_value=101.3, original_unit="F", flags=["device_clock_ahead"])
    )
    validate(resource)
    texts = " ".join(n["text"] for n in resource["note"])
    assert "101.3 [degF]" in texts and "ahead" in texts
    assert resource["valueQuantity"]["value"] == 38.5


@pytest.mark.parametrize(
    ("site", "snomed"),
    [
        ("axillary", "91470000"),
        ("oral", "74262004"),
        ("tympanic", "42859004"),
        ("skin_patch", "39937001"),
        ("temporal", None),
    ],
)
def test_every_site_has_a_body_site_and_method(site: str, snomed: str | None) -> None:
    """Each site names its body structure (SNOMED CT where an exact concept exists) and method."""
    resource = fhir.temperature_observation(reading(site=site))
    validate(resource)
    codes = [c["code"] for c in resource["bodySite"].get("coding", [])]
    assert codes == ([snomed] if snomed else [])
    assert resource["method"]["coding"] == [{"system": fhir.READING_SITES, "code": site}]


def test_unknown_site_gives_no_body_site() -> None:
    """``unknown`` invents nothing."""
    resource = fhir.temperature_observation(reading(site="unknown"))
    validate(resource)
    assert "bodySite" not in resource and "method" not in resource


def test_naive_time_is_refused() -> None:
    """A time without an offset never becomes a FHIR instant."""
    with pytest.raises(ValueError, match="offset"):
        fhir.temperature_observation(reading(device_time=datetime(2026, 3, 1, 3, 0)))  # noqa: DTZ001


def test_pump_status_has_state_rate_and_volume() -> None:
    """Rate in mL/h (MDC_FLOW_FLUID_PUMP), volume remaining in mL, the state as a code; the
    optional bag volume and battery only when sent."""
    row = {
        "device_time": AT,
        "ingest_time": AT,
        "patient_id": "P-1",
        "device_id": "pump-1",
        "message_id": uuid.UUID(int=3),
        "state": "stopped",
        "rate_ml_h": 10.0,
        "volume_remaining_ml": 120.5,
        "bag_volume_ml": None,
        "battery_pct": 40.0,
        "flags": [],
    }
    resource = fhir.pump_status_observation(row)
    validate(resource)
    parts = {c["code"]["coding"][-1]["code"]: c for c in resource["component"]}
    assert set(parts) == {"pump-state", "rate", "volume-remaining", "battery"}
    assert parts["pump-state"]["valueCodeableConcept"]["coding"][0]["code"] == "stopped"
    assert parts["rate"]["valueQuantity"] == {
        "value": 10.0,
        "unit": "mL/h",
        "system": fhir.UCUM,
        "code": "mL/h",
    }
    assert parts["rate"]["code"]["coding"][0]["code"] == "157784"
    assert parts["volume-remaining"]["valueQuantity"]["value"] == 120.5


@pytest.mark.parametrize("kind", ["thermometer", "pump"])
def test_device(kind: str) -> None:
    """A device with its identifier, kind and patient; a thermometer is the PHD thermometer."""
    resource = fhir.device(
        {
            "device_id": "d-1",
            "kind": kind,
            "model": "M1",
            "patient_id": "P-1",
            "reporting": "spot_check",
        }
    )
    validate(resource)
    assert resource["patient"] == {"reference": "Patient/P-1"}
    assert ("specialization" in resource) == (kind == "thermometer")


def test_patient_is_an_identifier_only() -> None:
    """No name, birth date or address: Vigil has none."""
    resource = fhir.patient("P-1")
    validate(resource)
    assert set(resource) == {"resourceType", "id", "identifier"}


@pytest.mark.parametrize(
    ("priority", "code"), [("high", "PH"), ("medium", "PM"), ("low", "PL"), ("info", "PN")]
)
def test_flag_priority(priority: str, code: str) -> None:
    """IEC 60601-1-8 priorities map onto the flag-priority extension's codes."""
    resource = fhir.flag(episode(priority=priority))
    validate(resource)
    extension = resource["extension"][0]
    assert extension["url"] == fhir.FLAG_PRIORITY_EXTENSION
    assert extension["valueCodeableConcept"]["coding"][0]["code"] == code


def test_flag_is_active_until_cleared_or_resolved() -> None:
    """Open: active, no end. Cleared (end phase) or resolved: inactive, ending at the first.
    The temperature evidence is linked; other evidence is not an Observation."""
    open_flag = fhir.flag(episode())
    validate(open_flag)
    assert open_flag["status"] == "active" and "end" not in open_flag["period"]
    details = [e for e in open_flag["extension"] if e["url"] == fhir.FLAG_DETAIL_EXTENSION]
    assert [d["valueReference"]["reference"] for d in details] == [
        f"Observation/temp-{uuid.UUID(int=1)}"
    ]
    cleared = fhir.flag(episode(cleared_at=AT + timedelta(hours=1)))
    resolved = fhir.flag(
        episode(cleared_at=AT + timedelta(hours=2), resolved_at=AT + timedelta(minutes=30))
    )
    for resource in (cleared, resolved):
        validate(resource)
        assert resource["status"] == "inactive"
    assert cleared["period"]["end"] == (AT + timedelta(hours=1)).isoformat()
    assert resolved["period"]["end"] == (AT + timedelta(minutes=30)).isoformat()
    assert fhir.flag(episode(kind="technical"))["category"][0]["coding"][0]["code"] == "safety"


@pytest.mark.parametrize(
    ("status", "retrying", "expected"),
    [
        ("queued", False, "preparation"),
        ("sending", False, "in-progress"),
        ("sent", False, "completed"),
        ("delivered", False, "completed"),
        ("failed", True, "in-progress"),
        ("failed", False, "stopped"),
        ("cancelled", False, "not-done"),
        ("unknown", False, "unknown"),
    ],
)
def test_page_status(status: str, retrying: bool, expected: str) -> None:
    """Every page status has its Communication status; a failed page still retried is in
    progress, one given up is stopped (with the reason)."""
    resource = fhir.page_communication(
        page(
            status=status,
            next_attempt_at=AT if retrying else None,
            sent_at=None,
            last_detail="SMTP 550",
        ),
        "flag-1",
    )
    validate(resource)
    assert resource["status"] == expected
    assert ("statusReason" in resource) == (expected in ("stopped", "in-progress", "unknown"))


def test_pages_and_acknowledgement() -> None:
    """Each page is a Communication about the Flag with the alert's priority (high is stat); the
    acknowledgement answers the pages sent before it, not the ones after."""
    acked = episode(acknowledged_by="nurse-1", acknowledged_at=AT + timedelta(minutes=3))
    before = page()
    after = page(
        page_id=uuid.UUID(int=12), created_at=AT + timedelta(minutes=10), purpose="all_clear"
    )
    resources = fhir.episode_communications(acked, [before, after])
    for resource in resources:
        validate(resource)
    first, second, ack = resources
    assert first["priority"] == "stat" and first["about"] == [
        {"reference": f"Flag/{uuid.UUID(int=7)}"}
    ]
    assert first["category"][0]["coding"][0]["code"] == "alert"
    assert second["category"][0]["coding"][0]["code"] == "notification"
    assert first["sent"] == (AT + timedelta(seconds=2)).isoformat()
    assert ack["id"] == f"ack-{uuid.UUID(int=7)}"
    assert ack["sender"]["display"] == "nurse-1"
    assert ack["inResponseTo"] == [{"reference": f"Communication/{uuid.UUID(int=11)}"}]
    assert fhir.episode_communications(episode(), [before]) == [
        fhir.page_communication(before, str(uuid.UUID(int=7)))
    ]


def test_searchset_capability_and_manifest_are_valid() -> None:
    """The Bundle, the CapabilityStatement and the OperationOutcome parse as R4 resources."""
    bundle = fhir.searchset(
        [fhir.patient("P-1"), fhir.temperature_observation(reading())],
        self_url="http://x/fhir/Observation?patient=P-1",
        next_url="http://x/fhir/Observation?patient=P-1&_offset=2",
        total=3,
        base_url="http://x/fhir",
    )
    assert len(validate(bundle).entry) == 2
    statement = capability_statement("http://x/fhir", AT, "1")
    assert validate(statement).fhirVersion == "4.0.1"
    validate(fhir.operation_outcome("not-found", "no such patient"))
    manifest = export_manifest(AT, "http://x/fhir/Patient/$export", [("Flag", "http://x/f", 2)])
    assert manifest["output"] == [{"type": "Flag", "url": "http://x/f", "count": 2}]


def test_date_search() -> None:
    """Prefixes on a year, a month, a day and an instant; several parameters narrow together;
    a time without an offset or a malformed value is a search error."""
    day = date_range(["2026-03-01"])
    assert (day.since, day.until) == (AT.replace(hour=0), AT.replace(hour=0) + timedelta(days=1))
    month = date_range(["ge2026-02", "lt2026-03-02"])
    assert month.since == datetime(2026, 2, 1, tzinfo=UTC)
    assert month.until == datetime(2026, 3, 2, tzinfo=UTC)
    december = date_range(["2025-12"])
    assert december.until == datetime(2026, 1, 1, tzinfo=UTC)
    assert date_range(["gt2026-03-01T03:00:00Z"]).since == AT + timedelta(seconds=1)
    assert date_range(["le2026-03-01T04:00:00+01:00"]).until == AT + timedelta(seconds=1)
    for bad in ("2026-03-01T03:00:00", "yesterday", "ne2026", "2026-13"):
        with pytest.raises(SearchError):
            date_range([bad])


def test_code_search() -> None:
    """LOINC or MDC selects temperatures, the Vigil code pump statuses, a wrong system or an
    unknown code nothing; no code selects both."""
    assert observation_kinds([]) == observation_kinds(["8310-5,pump-status"])
    both = observation_kinds([])
    assert both.temperature and both.pump_status
    loinc = observation_kinds(["http://loinc.org|8310-5"])
    assert loinc.temperature and not loinc.pump_status
    mdc = observation_kinds([f"{fhir.MDC}|150364"])
    assert mdc.temperature and not mdc.pump_status
    pump = observation_kinds([f"{fhir.OBSERVATION_CODES}|pump-status"])
    assert pump.pump_status and not pump.temperature
    for nothing in (["http://snomed.info/sct|8310-5"], ["29463-7"], ["|8310-5"]):
        kinds = observation_kinds(nothing)
        assert not kinds.temperature and not kinds.pump_status
