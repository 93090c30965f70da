"""Who may do what: roles and care-team scope, decided without I/O.

A principal sees a patient only when the patient's care team is one of the principal's teams;
outside that the API answers 404, so a caller learns nothing about patients of other teams.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    CLINICIAN = "clinician"
    CHARGE_NURSE = "charge_nurse"
    AUDITOR = "auditor"
    ADMIN = "admin"


class Action(StrEnum):
    READ_PATIENT = "read_patient"
    ACKNOWLEDGE = "acknowledge"
    RESOLVE = "resolve"
    READ_AUDIT = "read_audit"
    MANAGE_USERS = "manage_users"
    CHANGE_THRESHOLDS = "change_thresholds"
    # Enrol patients, change their weight, register devices and bind, unbind or swap them.
    MANAGE_PATIENTS = "manage_patients"
    # Change who is paged and how: the care team, its people, on-call schedules and overrides,
    # the escalation policy, quiet hours and the early-cycle escalation.
    MANAGE_TEAM = "manage_team"


_ALLOWED: dict[Role, frozenset[Action]] = {
    Role.CLINICIAN: frozenset({Action.READ_PATIENT, Action.ACKNOWLEDGE}),
    # Threshold changes are signed off by the charge nurse (or an admin), never a clinician alone.
    Role.CHARGE_NURSE: frozenset(
        {
            Action.READ_PATIENT,
            Action.ACKNOWLEDGE,
            Action.RESOLVE,
            Action.CHANGE_THRESHOLDS,
            Action.MANAGE_PATIENTS,
            Action.MANAGE_TEAM,
        }
    ),
    # Engineers and auditors read everything of their teams and change nothing.
    Role.AUDITOR: frozenset({Action.READ_PATIENT, Action.READ_AUDIT}),
    Role.ADMIN: frozenset(
        {
            Action.READ_PATIENT,
            Action.ACKNOWLEDGE,
            Action.RESOLVE,
            Action.READ_AUDIT,
            Action.MANAGE_USERS,
            Action.MANAGE_PATIENTS,
            Action.MANAGE_TEAM,
        }
    ),
}


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    username: str
    role: Role
    care_teams: frozenset[str]

    def may(self, action: Action) -> bool:
        return action in _ALLOWED[self.role]

    def sees_team(self, care_team_id: str | None) -> bool:
        return care_team_id is not None and care_team_id in self.care_teams
