"""The FHIR interface's CapabilityStatement and its bulk-export manifest, built without I/O.

The statement lists exactly what ``services.api.entrypoints.http.fhir`` serves; a test reads every
interaction and search parameter it names back from the live server.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from services.api.domain import fhir
from services.api.domain.fhir_scopes import PATIENT_READ, USER_READ

#: Resource types a bulk export can hold, in the order their files are listed.
EXPORT_TYPES = ("Patient", "Device", "Observation", "Flag", "Communication")

_SEARCH: dict[str, list[tuple[str, str, str]]] = {
    "Patient": [("identifier", "token", "The Vigil patient identifier (urn:vigil:patient).")],
    "Device": [("patient", "reference", "Devices ever bound to the patient.")],
    "Observation": [
        ("patient", "reference", "Required: the patient the readings are about."),
        (
            "date",
            "date",
            "Device time of the reading (effectiveDateTime); prefixes eq ge gt le lt.",
        ),
        (
            "code",
            "token",
            "LOINC 8310-5 or MDC 150364 (temperature), urn:vigil:observation-code"
            "|pump-status (pump status).",
        ),
        ("_count", "number", "Page size (1-1000, default 100)."),
    ],
    "Flag": [("patient", "reference", "Required: the patient the alarms are about.")],
    "Communication": [("patient", "reference", "Required: the patient the pages are about.")],
}


def capability_statement(
    base_url: str, published: datetime, software_version: str
) -> dict[str, Any]:
    """What the server does: read and search per resource type, and ``Patient/$export``."""
    resources = []
    for resource_type in EXPORT_TYPES:
        resource: dict[str, Any] = {
            "type": resource_type,
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchParam": [
                {"name": name, "type": kind, "documentation": text}
                for name, kind, text in _SEARCH[resource_type]
            ],
        }
        if resource_type == "Patient":
            resource["operation"] = [
                {
                    "name": "export",
                    "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/"
                    "patient-export",
                    "documentation": "Asynchronous bulk export (NDJSON) of the patients of the "
                    "caller's care teams, or of those named by `patient`.",
                }
            ]
        resources.append(resource)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": fhir.instant(published),
        "publisher": "Vigil",
        "kind": "instance",
        "software": {"name": "Vigil care-team API", "version": software_version},
        "implementation": {
            "description": "Readings and alarms of children on home blinatumomab infusions",
            "url": base_url,
        },
        "fhirVersion": fhir.FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": "Bearer tokens of the care-team API (POST /auth/token); every "
                "resource is limited to the patients of the caller's care teams.",
                "security": {
                    "cors": False,
                    "description": "SMART on FHIR style scopes on the bearer token's `scope` "
                    f"claim: `{USER_READ}` reads every resource of the patients of the "
                    f"user's care teams (granted by default to a role that reads patients); "
                    f"`{PATIENT_READ}` reads only the patient of the token's `patient` claim "
                    "(ask for it with the `scope` and `patient` fields of POST /auth/token). "
                    "A token without either is refused (403).",
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/"
                                    "restful-security-service",
                                    "code": "OAuth",
                                }
                            ]
                        }
                    ],
                },
                "resource": resources,
            }
        ],
    }


def export_manifest(
    transaction_time: datetime,
    request_url: str,
    outputs: Sequence[tuple[str, str, int]],
) -> dict[str, Any]:
    """The Bulk Data completion manifest: one output per (type, url, count)."""
    return {
        "transactionTime": fhir.instant(transaction_time),
        "request": request_url,
        "requiresAccessToken": True,
        "output": [
            {"type": resource_type, "url": url, "count": count}
            for resource_type, url, count in outputs
        ],
        "error": [],
    }
