"""The SMART on FHIR style scopes a token gets and what they let it read (pure)."""

from __future__ import annotations

import pytest

from services.api.domain.fhir_scopes import (
    PATIENT_READ,
    USER_READ,
    FhirAccess,
    ScopeError,
    fhir_access,
    grant,
)


def test_a_reader_gets_user_read_by_default() -> None:
    assert grant(None, may_read=True, patient=None) == (USER_READ,)
    assert grant("", may_read=True, patient=None) == (USER_READ,)


def test_a_requested_scope_is_granted_as_asked_and_unknown_ones_are_left_out() -> None:
    assert grant("patient/*.read launch", may_read=True, patient="P-1") == (PATIENT_READ,)
    assert grant("openid", may_read=True, patient=None) == ()
    assert grant(f"{PATIENT_READ} {USER_READ}", True, "P-1") == (USER_READ, PATIENT_READ)


def test_a_role_that_may_not_read_patients_gets_no_fhir_scope() -> None:
    assert grant(None, may_read=False, patient=None) == ()
    assert grant(USER_READ, may_read=False, patient=None) == ()


@pytest.mark.parametrize(
    ("requested", "patient"), [(PATIENT_READ, None), (None, "P-1"), (USER_READ, "P-1")]
)
def test_a_patient_goes_with_patient_read_and_only_with_it(
    requested: str | None, patient: str | None
) -> None:
    with pytest.raises(ScopeError):
        grant(requested, may_read=True, patient=patient)


def test_access_of_each_scope() -> None:
    assert fhir_access(USER_READ, None) == FhirAccess(patient=None)
    assert fhir_access(f"{PATIENT_READ} {USER_READ}", "P-1") == FhirAccess(patient=None)
    limited = fhir_access(PATIENT_READ, "P-1")
    assert limited == FhirAccess(patient="P-1")
    assert limited.sees("P-1") and not limited.sees("P-2")
    assert FhirAccess(patient=None).sees("P-2")
    # No FHIR scope, or a patient scope without its patient: nothing under /fhir.
    assert fhir_access("", None) is None
    assert fhir_access("openid profile", None) is None
    assert fhir_access(PATIENT_READ, None) is None
    assert fhir_access("user/*.write", None) is None
