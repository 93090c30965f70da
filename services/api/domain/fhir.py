"""Vigil's records as FHIR R4 resources: database rows in, resource dicts out, no I/O.

What maps to what (docs/fhir.md has the table and the reasons):

- a temperature reading -> ``Observation`` (LOINC 8310-5 and IEEE 11073 MDC_TEMP_BODY, UCUM
  ``Cel``, body site and method from the reading's site, device time as ``effectiveDateTime``,
  ingest time as ``issued``; an implausible value is a ``dataAbsentReason``, never a value);
- a pump status -> ``Observation`` with the rate, the volume remaining and the state as
  components;
- a device -> ``Device``; a patient -> ``Patient`` by identifier only;
- an alert episode (every phase of one dedup key) -> ``Flag``; each page sent for it ->
  ``Communication``, and an acknowledgement -> a ``Communication`` in response to the pages.

Every function here is pure: the caller supplies rows and, where a resource needs the time,
the time. Nothing here reads a clock or a database.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

FHIR_VERSION = "4.0.1"

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
MDC = "urn:iso:std:iso:11073:10101"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
FLAG_CATEGORY = "http://terminology.hl7.org/CodeSystem/flag-category"
FLAG_PRIORITY_EXTENSION = "http://hl7.org/fhir/StructureDefinition/flag-priority"
FLAG_PRIORITY_CODES = "http://hl7.org/fhir/flag-priority-code"
FLAG_DETAIL_EXTENSION = "http://hl7.org/fhir/StructureDefinition/flag-detail"
COMMUNICATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/communication-category"
PARTICIPATION_MODE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode"
VITAL_SIGNS_PROFILE = "http://hl7.org/fhir/StructureDefinition/bodytemp"

# Vigil's own identifiers and codes: stable URNs, so a receiving record can keep them apart from
# any other system's.
PATIENT_IDENTIFIER = "urn:vigil:patient"
DEVICE_IDENTIFIER = "urn:vigil:device"
USER_IDENTIFIER = "urn:vigil:user"
RECIPIENT_IDENTIFIER = "urn:vigil:page-recipient"
ALERT_IDENTIFIER = "urn:vigil:alert-episode"
OBSERVATION_CODES = "urn:vigil:observation-code"
DEVICE_KINDS = "urn:vigil:device-kind"
READING_SITES = "urn:vigil:temperature-site"
PUMP_STATES = "urn:vigil:pump-state"
ALERT_CODES = "urn:vigil:alert-code"
INGEST_FLAGS = "urn:vigil:ingest-flag"
PAGE_PURPOSES = "urn:vigil:page-purpose"

TEMPERATURE_PREFIX = "temp-"
PUMP_STATUS_PREFIX = "pump-"
ACK_PREFIX = "ack-"

BODY_TEMPERATURE = {"system": LOINC, "code": "8310-5", "display": "Body temperature"}
MDC_TEMP_BODY = {"system": MDC, "code": "150364", "display": "MDC_TEMP_BODY"}
PUMP_STATUS = {
    "system": OBSERVATION_CODES,
    "code": "pump-status",
    "display": "Infusion pump status",
}
MDC_FLOW_FLUID_PUMP = {"system": MDC, "code": "157784", "display": "MDC_FLOW_FLUID_PUMP"}

#: The searchable codes of each kind of Observation (``code=system|code`` or ``code=code``).
TEMPERATURE_CODES = frozenset({(LOINC, "8310-5"), (MDC, "150364")})
PUMP_STATUS_CODES = frozenset({(OBSERVATION_CODES, "pump-status")})


def _site(code: str | None, display: str, text: str) -> dict[str, Any]:
    concept: dict[str, Any] = {"text": text}
    if code is not None:
        concept["coding"] = [{"system": SNOMED, "code": code, "display": display}]
    return concept


# The reading's site -> (bodySite, method). SNOMED CT codes for the sites that have an exact
# body-structure concept; the temporal-artery forehead scan is named in text only.
_SITES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "axillary": (
        _site("91470000", "Axillary region structure", "Axilla"),
        {"text": "Axillary thermometry"},
    ),
    "oral": (
        _site("74262004", "Oral cavity structure", "Mouth"),
        {"text": "Oral thermometry"},
    ),
    "tympanic": (
        _site("42859004", "Tympanic membrane structure", "Ear (tympanic membrane)"),
        {"text": "Infrared tympanic thermometry"},
    ),
    "temporal": (
        _site(None, "", "Forehead (temporal artery)"),
        {"text": "Infrared temporal artery thermometry"},
    ),
    "skin_patch": (
        _site("39937001", "Skin structure", "Skin"),
        {"text": "Continuous skin-surface sensor (wearable patch)"},
    ),
}
for _name, (_body, _method) in _SITES.items():
    _method["coding"] = [{"system": READING_SITES, "code": _name}]

_VITAL_SIGNS = [
    {"coding": [{"system": OBSERVATION_CATEGORY, "code": "vital-signs", "display": "Vital Signs"}]}
]
_THERAPY = [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "therapy", "display": "Therapy"}]}]
_TEMPERATURE_CODE = {"coding": [BODY_TEMPERATURE, MDC_TEMP_BODY], "text": "Body temperature"}
_PUMP_STATUS_CODE = {"coding": [PUMP_STATUS], "text": "Infusion pump status"}
_SENSOR_FAULT = {
    "coding": [{"system": DATA_ABSENT_REASON, "code": "error", "display": "Error"}],
    "text": "Implausible for a body temperature: a sensor fault",
}

_FLAG_NOTES = {
    "device_clock_ahead": "The device's clock was ahead of the server's by more than ingest "
    "allows when the reading arrived; the effective time is the device's and may be wrong.",
    "device_clock_behind": "The device's clock was behind the server's by more than ingest "
    "allows when the reading arrived; the effective time is the device's and may be wrong.",
}


def instant(at: datetime) -> str:
    """A FHIR ``instant``/``dateTime``: RFC 3339 with its offset. A naive time is an error."""
    if at.utcoffset() is None:
        raise ValueError("FHIR times need a UTC offset")
    return at.isoformat()


def reference(resource_type: str, resource_id: str) -> dict[str, str]:
    return {"reference": f"{resource_type}/{resource_id}"}


def temperature_id(message_id: object) -> str:
    return f"{TEMPERATURE_PREFIX}{message_id}"


def pump_status_id(message_id: object) -> str:
    return f"{PUMP_STATUS_PREFIX}{message_id}"


def patient(patient_id: str) -> dict[str, Any]:
    """The patient by identifier only: Vigil holds no name, birth date or address."""
    return {
        "resourceType": "Patient",
        "id": patient_id,
        "identifier": [{"system": PATIENT_IDENTIFIER, "value": patient_id}],
    }


def device(row: Mapping[str, Any]) -> dict[str, Any]:
    """A pump or thermometer (``device_id``, ``kind``, ``model``, ``patient_id`` of its newest
    binding, ``reporting``). A thermometer carries the PHD thermometer specialization."""
    kind = row["kind"]
    resource: dict[str, Any] = {
        "resourceType": "Device",
        "id": row["device_id"],
        "identifier": [{"system": DEVICE_IDENTIFIER, "value": row["device_id"]}],
        "status": "active",
        "type": {
            "coding": [{"system": DEVICE_KINDS, "code": kind}],
            "text": "Ambulatory infusion pump" if kind == "pump" else "Thermometer",
        },
    }
    if row.get("model"):
        resource["modelNumber"] = row["model"]
    if kind == "thermometer":
        resource["specialization"] = [
            {
                "systemType": {
                    "coding": [
                        {"system": MDC, "code": "528392", "display": "MDC_DEV_SPEC_PROFILE_TEMP"}
                    ]
                }
            }
        ]
        if row.get("reporting"):
            resource["property"] = [
                {
                    "type": {"text": "reporting"},
                    "valueCode": [{"coding": [{"system": DEVICE_KINDS, "code": row["reporting"]}]}],
                }
            ]
    if row.get("patient_id"):
        resource["patient"] = reference("Patient", row["patient_id"])
    return resource


def temperature_observation(row: Mapping[str, Any]) -> dict[str, Any]:
    """One temperature reading (a ``temperature_readings`` row) as a body-temperature
    Observation. An ``implausible_temperature`` flag means a sensor fault: the value is left
    out (``dataAbsentReason`` ``error``) and the number the device sent is kept in a note.
    A clock flag is a note and a ``meta.tag``; a reading sent in °F keeps its number in a note."""
    flags: Sequence[str] = row.get("flags") or ()
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": temperature_id(row["message_id"]),
        "meta": {"profile": [VITAL_SIGNS_PROFILE]},
        "status": "final",
        "category": _VITAL_SIGNS,
        "code": _TEMPERATURE_CODE,
        "subject": reference("Patient", row["patient_id"]),
        "effectiveDateTime": instant(row["device_time"]),
        "issued": instant(row["ingest_time"]),
        "device": reference("Device", row["device_id"]),
    }
    notes: list[dict[str, str]] = []
    if "implausible_temperature" in flags:
        resource["dataAbsentReason"] = _SENSOR_FAULT
        notes.append(
            {
                "text": f"The device sent {row['original_value']} {row['original_unit']}, "
                "outside the plausible range of a body temperature."
            }
        )
    else:
        resource["valueQuantity"] = {
            "value": round(float(row["value_c"]), 2),
            "unit": "Cel",
            "system": UCUM,
            "code": "Cel",
        }
        if row.get("original_unit") == "F":
            notes.append({"text": f"Sent in degrees Fahrenheit: {row['original_value']} [degF]."})
    site = _SITES.get(row.get("site") or "")
    if site is not None:
        resource["bodySite"], resource["method"] = site
    tags = [{"system": INGEST_FLAGS, "code": flag} for flag in flags]
    if tags:
        resource["meta"] = {"profile": [VITAL_SIGNS_PROFILE], "tag": tags}
    notes.extend({"text": _FLAG_NOTES[flag]} for flag in flags if flag in _FLAG_NOTES)
    if notes:
        resource["note"] = notes
    return resource


def pump_status_observation(row: Mapping[str, Any]) -> dict[str, Any]:
    """One pump status (a ``pump_status`` row): state, programmed rate, volume remaining and,
    when the pump sent them, the volume hung and the battery charge, as components."""
    components: list[dict[str, Any]] = [
        {
            "code": {
                "coding": [{"system": OBSERVATION_CODES, "code": "pump-state"}],
                "text": "Pump state",
            },
            "valueCodeableConcept": {
                "coding": [{"system": PUMP_STATES, "code": row["state"]}],
                "text": row["state"],
            },
        },
        {
            "code": {
                "coding": [MDC_FLOW_FLUID_PUMP, {"system": OBSERVATION_CODES, "code": "rate"}],
                "text": "Programmed rate",
            },
            "valueQuantity": _millilitres(row["rate_ml_h"], "mL/h"),
        },
        {
            "code": {
                "coding": [{"system": OBSERVATION_CODES, "code": "volume-remaining"}],
                "text": "Volume remaining",
            },
            "valueQuantity": _millilitres(row["volume_remaining_ml"], "mL"),
        },
    ]
    if row.get("bag_volume_ml") is not None:
        components.append(
            {
                "code": {
                    "coding": [{"system": OBSERVATION_CODES, "code": "bag-volume"}],
                    "text": "Volume hung at the last bag change",
                },
                "valueQuantity": _millilitres(row["bag_volume_ml"], "mL"),
            }
        )
    if row.get("battery_pct") is not None:
        components.append(
            {
                "code": {
                    "coding": [{"system": OBSERVATION_CODES, "code": "battery"}],
                    "text": "Battery charge",
                },
                "valueQuantity": {
                    "value": float(row["battery_pct"]),
                    "unit": "%",
                    "system": UCUM,
                    "code": "%",
                },
            }
        )
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": pump_status_id(row["message_id"]),
        "status": "final",
        "category": _THERAPY,
        "code": _PUMP_STATUS_CODE,
        "subject": reference("Patient", row["patient_id"]),
        "effectiveDateTime": instant(row["device_time"]),
        "issued": instant(row["ingest_time"]),
        "device": reference("Device", row["device_id"]),
        "component": components,
    }
    flags: Sequence[str] = row.get("flags") or ()
    if flags:
        resource["meta"] = {"tag": [{"system": INGEST_FLAGS, "code": f} for f in flags]}
        notes = [{"text": _FLAG_NOTES[f]} for f in flags if f in _FLAG_NOTES]
        if notes:
            resource["note"] = notes
    return resource


def _millilitres(value: float, unit: str) -> dict[str, Any]:
    return {"value": float(value), "unit": unit, "system": UCUM, "code": unit}


# Pump statuses as NDJSON lines for bulk export, without building the dicts: the constant parts
# of the resource are serialised once, from the same constants as ``pump_status_observation``,
# and each row fills in its values. The bytes are those of ``orjson.dumps`` of that mapping
# (the tests compare the two); a flagged row (meta tags, notes) takes the dict path.
def _json_piece(value: object) -> bytes:
    return orjson.dumps(value)


def _pump_line_pieces() -> tuple[bytes, ...]:
    sample = pump_status_observation(
        {
            "message_id": "\x00id",
            "patient_id": "\x00patient",
            "device_id": "\x00device",
            "device_time": datetime(2000, 1, 1, tzinfo=UTC),
            "ingest_time": datetime(2000, 1, 2, tzinfo=UTC),
            "state": "\x00state",
            "rate_ml_h": 1.0,
            "volume_remaining_ml": 2.0,
            "bag_volume_ml": 3.0,
            "battery_pct": 4.0,
            "flags": [],
        }
    )
    components = sample["component"]
    quantity = [c.pop("valueQuantity") for c in components[1:]]
    state = components[0]
    head = {k: v for k, v in sample.items() if k in ("resourceType",)}
    return (
        # {"resourceType":"Observation","id":"pump-
        _json_piece(head)[:-1] + b',"id":"' + PUMP_STATUS_PREFIX.encode(),
        # ","status":…,"subject":{"reference":
        b'","status":'
        + _json_piece(sample["status"])
        + b',"category":'
        + _json_piece(sample["category"])
        + b',"code":'
        + _json_piece(sample["code"])
        + b',"subject":{"reference":',
        b'},"effectiveDateTime":"',
        b'","issued":"',
        b'","device":{"reference":',
        # },"component":[{"code":…,"valueCodeableConcept":{"coding":[{"system":…,"code":
        b'},"component":[{"code":'
        + _json_piece(state["code"])
        + b',"valueCodeableConcept":{"coding":[{"system":'
        + _json_piece(PUMP_STATES)
        + b',"code":',
        b'}],"text":',
        b'}},{"code":' + _json_piece(components[1]["code"]) + b',"valueQuantity":{"value":',
        b',"unit":'
        + _json_piece(quantity[0]["unit"])
        + b',"system":'
        + _json_piece(UCUM)
        + b',"code":'
        + _json_piece(quantity[0]["code"])
        + b"}}",
        b',{"code":' + _json_piece(components[2]["code"]) + b',"valueQuantity":{"value":',
        b',"unit":"mL","system":' + _json_piece(UCUM) + b',"code":"mL"}}',
        b',{"code":' + _json_piece(components[3]["code"]) + b',"valueQuantity":{"value":',
        b',{"code":' + _json_piece(components[4]["code"]) + b',"valueQuantity":{"value":',
        b',"unit":"%","system":' + _json_piece(UCUM) + b',"code":"%"}}',
        b"]}\n",
    )


(
    _P_HEAD,
    _P_SUBJECT,
    _P_EFFECTIVE,
    _P_ISSUED,
    _P_DEVICE,
    _P_STATE,
    _P_STATE_TEXT,
    _P_RATE,
    _P_RATE_END,
    _P_VOLUME,
    _P_ML_END,
    _P_BAG,
    _P_BATTERY,
    _P_PERCENT_END,
    _P_END,
) = _pump_line_pieces()


def pump_status_lines(rows: Iterable[Mapping[str, Any]]) -> tuple[int, bytes]:
    """Pump statuses as NDJSON (one ``pump_status_observation`` per line, each ending in a
    newline), and how many: byte for byte ``orjson.dumps`` of the mapping, about half its
    cost. ``rows`` are ``pump_status`` rows (mappings or database records)."""
    dumps = orjson.dumps
    references: dict[str, bytes] = {}
    lines: list[bytes] = []
    append = lines.append
    for row in rows:
        if row["flags"]:
            append(dumps(pump_status_observation(row), option=orjson.OPT_APPEND_NEWLINE))
            continue
        patient_id, device_id = row["patient_id"], row["device_id"]
        subject = references.get(patient_id)
        if subject is None:
            subject = references[patient_id] = dumps(f"Patient/{patient_id}")
        device_ref = references.get("\x00" + device_id)
        if device_ref is None:
            device_ref = references["\x00" + device_id] = dumps(f"Device/{device_id}")
        state = dumps(row["state"])
        parts = [
            _P_HEAD,
            str(row["message_id"]).encode(),
            _P_SUBJECT,
            subject,
            _P_EFFECTIVE,
            instant(row["device_time"]).encode(),
            _P_ISSUED,
            instant(row["ingest_time"]).encode(),
            _P_DEVICE,
            device_ref,
            _P_STATE,
            state,
            _P_STATE_TEXT,
            state,
            _P_RATE,
            dumps(float(row["rate_ml_h"])),
            _P_RATE_END,
            _P_VOLUME,
            dumps(float(row["volume_remaining_ml"])),
            _P_ML_END,
        ]
        bag, battery = row["bag_volume_ml"], row["battery_pct"]
        if bag is not None:
            parts += (_P_BAG, dumps(float(bag)), _P_ML_END)
        if battery is not None:
            parts += (_P_BATTERY, dumps(float(battery)), _P_PERCENT_END)
        parts.append(_P_END)
        append(b"".join(parts))
    return len(lines), b"".join(lines)


# IEC 60601-1-8 priority -> the flag-priority extension's code (PH, PM, PL, PN).
_FLAG_PRIORITY = {
    "high": ("PH", "High priority"),
    "medium": ("PM", "Medium priority"),
    "low": ("PL", "Low priority"),
    "info": ("PN", "No alarm"),
}
# IEC 60601-1-8 priority -> Communication.priority (request-priority).
_COMMUNICATION_PRIORITY = {"high": "stat", "medium": "urgent", "low": "routine", "info": "routine"}


def flag(episode: Mapping[str, Any]) -> dict[str, Any]:
    """An alert episode (every phase of one dedup key) as a Flag.

    ``episode``: ``flag_id`` (the opening phase's alert id), ``dedup_key``, ``patient_id``,
    ``device_id``, ``kind``, ``code``, ``title``, ``priority`` (the newest non-end phase's),
    ``opened_at`` (device time), ``cleared_at`` (device time of the end phase, if any),
    ``resolved_at`` (when someone resolved it), ``evidence`` (the opening phase's). Active until
    cleared or resolved; the period ends at whichever came first. The temperature readings in
    the evidence are linked with the flag-detail extension."""
    kind = episode["kind"]
    code, display = _FLAG_PRIORITY.get(episode["priority"] or "info", _FLAG_PRIORITY["info"])
    category = "clinical" if kind == "physiological" else "safety"
    ends = [t for t in (episode.get("cleared_at"), episode.get("resolved_at")) if t is not None]
    period: dict[str, str] = {"start": instant(episode["opened_at"])}
    if ends:
        period["end"] = instant(max(min(ends), episode["opened_at"]))
    extensions: list[dict[str, Any]] = [
        {
            "url": FLAG_PRIORITY_EXTENSION,
            "valueCodeableConcept": {
                "coding": [{"system": FLAG_PRIORITY_CODES, "code": code, "display": display}],
                "text": episode["priority"],
            },
        }
    ]
    for message_id in evidence_readings(episode.get("evidence")):
        extensions.append(
            {
                "url": FLAG_DETAIL_EXTENSION,
                "valueReference": reference("Observation", temperature_id(message_id)),
            }
        )
    return {
        "resourceType": "Flag",
        "id": str(episode["flag_id"]),
        "extension": extensions,
        "identifier": [{"system": ALERT_IDENTIFIER, "value": episode["dedup_key"]}],
        "status": "inactive" if ends else "active",
        "category": [
            {
                "coding": [{"system": FLAG_CATEGORY, "code": category}],
                "text": f"{kind} alarm",
            }
        ],
        "code": {
            "coding": [{"system": ALERT_CODES, "code": episode["code"]}],
            "text": episode["title"],
        },
        "subject": reference("Patient", episode["patient_id"]),
        "period": period,
        "author": reference("Device", episode["device_id"]),
    }


def evidence_readings(evidence: object) -> list[str]:
    """Message ids of the temperature readings in an alert's evidence (a list of evidence
    items, or its JSON text), in order, each once."""
    if isinstance(evidence, str):
        evidence = json.loads(evidence)
    if not isinstance(evidence, list):
        return []
    ids: list[str] = []
    for item in evidence:
        if not isinstance(item, dict) or item.get("name") != "temperature":
            continue
        message_id = str(item.get("message_id") or "")
        if message_id and message_id not in ids:
            ids.append(message_id)
    return ids


# pages.status -> Communication.status (event-status).
_PAGE_STATUS = {
    "queued": "preparation",
    "sending": "in-progress",
    "sent": "completed",
    "delivered": "completed",
    "cancelled": "not-done",
    "unknown": "unknown",
}
_MEDIUM = {
    "email": ("EMAILWRIT", "email"),
    "sms": ("WRITTEN", "SMS"),
    "webhook": ("ELECTRONIC", "webhook"),
}


def communication_status(page_status: str, retrying: bool) -> str:
    """A page's status as a Communication's: a failed page still to be retried is in progress;
    one given up is stopped."""
    if page_status == "failed":
        return "in-progress" if retrying else "stopped"
    return _PAGE_STATUS.get(page_status, "unknown")


def page_communication(page: Mapping[str, Any], flag_id: str | None) -> dict[str, Any]:
    """One page (a ``pages`` row with its alert's ``priority``, the first ``sent_at`` and
    ``delivered_at`` of its attempts and the newest attempt's ``last_detail``) as a
    Communication about the episode's Flag."""
    purpose = page.get("purpose") or "alert"
    mode, medium_text = _MEDIUM.get(page["channel"], ("ELECTRONIC", page["channel"]))
    resource: dict[str, Any] = {
        "resourceType": "Communication",
        "id": str(page["page_id"]),
        "status": communication_status(page["status"], page.get("next_attempt_at") is not None),
        "category": [
            {
                "coding": [
                    {
                        "system": COMMUNICATION_CATEGORY,
                        "code": "alert" if purpose in ("alert", "escalation") else "notification",
                    },
                    {"system": PAGE_PURPOSES, "code": purpose},
                ]
            }
        ],
        "priority": _COMMUNICATION_PRIORITY.get(page.get("priority") or "info", "routine"),
        "medium": [{"coding": [{"system": PARTICIPATION_MODE, "code": mode}], "text": medium_text}],
        "subject": reference("Patient", page["patient_id"]),
        "recipient": [
            {
                "identifier": {
                    "system": RECIPIENT_IDENTIFIER,
                    "value": page.get("recipient_ref") or page["recipient"],
                },
                "display": page["recipient"],
            }
        ],
        "payload": [{"contentString": page.get("title") or purpose}],
    }
    if flag_id is not None:
        resource["about"] = [reference("Flag", flag_id)]
    if page.get("sent_at") is not None:
        resource["sent"] = instant(page["sent_at"])
    if page.get("delivered_at") is not None:
        resource["received"] = instant(page["delivered_at"])
    if page.get("last_detail") and resource["status"] in ("stopped", "in-progress", "unknown"):
        resource["statusReason"] = {"text": str(page["last_detail"])[:500]}
    return resource


def acknowledgement_communication(
    episode: Mapping[str, Any], answered_page_ids: Iterable[object]
) -> dict[str, Any] | None:
    """The acknowledgement of an episode as a Communication from the person who acknowledged
    it, in response to the pages sent before it; None when nobody has acknowledged."""
    if episode.get("acknowledged_at") is None:
        return None
    by = episode.get("acknowledged_by") or "unknown"
    resource: dict[str, Any] = {
        "resourceType": "Communication",
        "id": f"{ACK_PREFIX}{episode['flag_id']}",
        "status": "completed",
        "category": [
            {
                "coding": [
                    {"system": COMMUNICATION_CATEGORY, "code": "notification"},
                    {"system": PAGE_PURPOSES, "code": "acknowledgement"},
                ]
            }
        ],
        "subject": reference("Patient", episode["patient_id"]),
        "about": [reference("Flag", str(episode["flag_id"]))],
        "sent": instant(episode["acknowledged_at"]),
        "sender": {"identifier": {"system": USER_IDENTIFIER, "value": by}, "display": by},
        "payload": [{"contentString": f"Acknowledged by {by}"}],
    }
    answered = [reference("Communication", str(page_id)) for page_id in answered_page_ids]
    if answered:
        resource["inResponseTo"] = answered
    return resource


def episode_communications(
    episode: Mapping[str, Any], pages: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The Communications of one episode: its pages, then its acknowledgement if any. The
    acknowledgement answers the pages created before it (the ones it stopped)."""
    flag_id = str(episode["flag_id"])
    resources = [page_communication(page, flag_id) for page in pages]
    acked_at = episode.get("acknowledged_at")
    if acked_at is not None:
        answered = [p["page_id"] for p in pages if p["created_at"] <= acked_at]
        ack = acknowledgement_communication(episode, answered)
        if ack is not None:
            resources.append(ack)
    return resources


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    """An error as FHIR reports one (``code`` from the issue-type value set)."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


def searchset(
    resources: Sequence[dict[str, Any]],
    *,
    self_url: str,
    next_url: str | None,
    total: int | None,
    base_url: str,
) -> dict[str, Any]:
    """A searchset Bundle of ``resources`` (all matches, each with its full URL)."""
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [{"relation": "self", "url": self_url}],
        "entry": [
            {
                "fullUrl": f"{base_url}/{r['resourceType']}/{r['id']}",
                "resource": r,
                "search": {"mode": "match"},
            }
            for r in resources
        ],
    }
    if total is not None:
        bundle["total"] = total
    if next_url is not None:
        bundle["link"].append({"relation": "next", "url": next_url})
    return bundle
