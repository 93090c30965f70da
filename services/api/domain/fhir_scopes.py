"""SMART on FHIR style scopes on the API's tokens, decided without I/O.

A token carries a ``scope`` claim (space-separated, as OAuth 2.0 writes scopes) and, for a
patient-level scope, a ``patient`` claim naming the patient. Of the FHIR scopes Vigil grants two:

- ``user/*.read``: every resource the user's care teams allow (the care-team scope of the rest
  of the API);
- ``patient/*.read``: the same, limited to the one patient of the ``patient`` claim.

The token endpoint grants ``user/*.read`` to a role that may read patients unless the client
asks for something narrower (``scope`` form field); scopes it does not grant are left out of the
answer's ``scope``, as OAuth 2.0 allows. A token without a FHIR read scope reads nothing under
``/fhir`` (403); a patient-level token asking about another patient gets the 404 of a patient
that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass

USER_READ = "user/*.read"
PATIENT_READ = "patient/*.read"
#: The scopes this server grants, in the order a granted ``scope`` lists them.
SUPPORTED = (USER_READ, PATIENT_READ)


class ScopeError(ValueError):
    """A scope request the token endpoint refuses (OAuth 2.0 ``invalid_scope``)."""


def grant(requested: str | None, may_read: bool, patient: str | None) -> tuple[str, ...]:
    """The FHIR scopes to put on a new token.

    ``requested``: the client's ``scope`` (None or empty: the default); ``may_read``: whether
    the user's role may read patients; ``patient``: the patient the client named for a
    patient-level scope (already checked to be one of the user's teams). Without a request a
    reader gets ``user/*.read``; with one, the supported scopes asked for and nothing else. A
    patient is named with ``patient/*.read`` and only with it."""
    asked = (requested or "").split()
    if PATIENT_READ in asked and patient is None:
        raise ScopeError(f"{PATIENT_READ} needs a patient")
    if patient is not None and PATIENT_READ not in asked:
        raise ScopeError(f"a patient is named only with {PATIENT_READ}")
    if not may_read:
        return ()
    if not asked:
        return (USER_READ,)
    return tuple(s for s in SUPPORTED if s in asked)


@dataclass(frozen=True, slots=True)
class FhirAccess:
    """What a token may read under ``/fhir``: everything of the user's care teams
    (``patient`` None) or only that patient of them."""

    patient: str | None

    def sees(self, patient_id: str | None) -> bool:
        """Whether a resource of ``patient_id`` (already among the user's teams) is in scope."""
        return self.patient is None or patient_id == self.patient


def fhir_access(scope: str, patient: str | None) -> FhirAccess | None:
    """The FHIR access a token's ``scope`` and ``patient`` claims give, or None (no FHIR read
    scope: 403). ``user/*.read`` wins over ``patient/*.read`` when a token has both."""
    scopes = scope.split()
    if USER_READ in scopes:
        return FhirAccess(patient=None)
    if PATIENT_READ in scopes and patient:
        return FhirAccess(patient=patient)
    return None
