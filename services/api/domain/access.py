"""Who may do what: roles and care-team scope, decided without I/O.

A principal sees a patient only when the patient's care team is one of the principal's teams;
outside that the API answers 404, so a caller learns nothing about patients of other teams.
During regional cover (docs/regional-cover.md) the patient routes see a principal whose
``care_teams`` also hold the teams its own teams cover at that moment, with ``cover`` naming the
agreements that allow it; every other route sees the principal's own teams only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
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
    # A charge nurse manages the logins of their own teams, within the roles of ``_GRANTS``.
    Role.CHARGE_NURSE: frozenset(
        {
            Action.READ_PATIENT,
            Action.ACKNOWLEDGE,
            Action.RESOLVE,
            Action.CHANGE_THRESHOLDS,
            Action.MANAGE_PATIENTS,
            Action.MANAGE_TEAM,
            Action.MANAGE_USERS,
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


# The roles a user may hand out, and the only roles of the users they may manage (deactivate,
# reset the password of, change the role or teams of): a charge nurse never one above their own,
# nor auditor (it reads the audit trail, which a charge nurse does not).
_GRANTS: dict[Role, frozenset[Role]] = {
    Role.CLINICIAN: frozenset(),
    Role.CHARGE_NURSE: frozenset({Role.CLINICIAN, Role.CHARGE_NURSE}),
    Role.AUDITOR: frozenset(),
    Role.ADMIN: frozenset(Role),
}


def may_grant(granter: Role, role: Role) -> bool:
    """Whether a user of role ``granter`` may hand out ``role`` or manage a user who holds it."""
    return role in _GRANTS[granter]


# What a covering user may do to a covered team's patients: read them and act on their alerts.
COVER_ACTIONS = frozenset({Action.READ_PATIENT, Action.ACKNOWLEDGE, Action.RESOLVE})


@dataclass(frozen=True, slots=True)
class CoverScope:
    """A covered team the principal acts for now, the agreement (and version) that allows it
    and when the window ends."""

    covered_team_id: str
    agreement_id: str
    version: int
    ends: datetime


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    username: str
    role: Role
    care_teams: frozenset[str]
    cover: tuple[CoverScope, ...] = ()

    def may(self, action: Action) -> bool:
        return action in _ALLOWED[self.role]

    def sees_team(self, care_team_id: str | None) -> bool:
        return care_team_id is not None and care_team_id in self.care_teams

    @property
    def covered_teams(self) -> frozenset[str]:
        """The teams the principal sees only through cover: their monitored patients only."""
        return frozenset(c.covered_team_id for c in self.cover)

    @property
    def own_teams(self) -> frozenset[str]:
        """The principal's own care teams, without those it covers."""
        return self.care_teams - {c.covered_team_id for c in self.cover}

    def covering(self, scopes: tuple[CoverScope, ...]) -> Principal:
        """The principal widened to the covered teams of ``scopes``."""
        if not scopes:
            return self
        covered = frozenset(c.covered_team_id for c in scopes)
        return replace(self, care_teams=self.care_teams | covered, cover=self.cover + scopes)

    def cover_of(self, care_team_id: str | None) -> CoverScope | None:
        """The cover through which the principal sees ``care_team_id`` (None: its own team, or
        not seen at all)."""
        return next((c for c in self.cover if c.covered_team_id == care_team_id), None)
