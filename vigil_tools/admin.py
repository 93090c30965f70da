"""``vigil admin``: enrol children, onboard their devices, end their infusion and discharge them,
manage the care-team API's logins and the teams' on-call schedules from the command line, over
the same use cases as the care-team API (``services.api.service_layer.enrolment``,
``discharge``, ``users`` and ``schedules``; notify's rows through ``services.notify.public``),
each change written to the audit trail under the operator's name.

Against the local stack (``--local``, the default when ``VIGIL_PG_DSN`` is not set) it reads the
stack's database settings and changes device accounts on the stack's Mosquitto; against another
database it changes the registry only, and refuses what needs the broker (``add-device``,
``rotate-credential``, ``revoke-credential``) rather than half-doing it.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Callable
from datetime import date, datetime, time
from typing import Any

import asyncpg

from services.api.adapters.audit import AuditTrail
from services.api.adapters.discharge import PostgresDischargeStore
from services.api.adapters.enrolment import PostgresRegistryStore
from services.api.domain.access import Role
from services.api.service_layer.discharge import DischargeService, Outcome
from services.api.service_layer.enrolment import (
    Actor,
    BindingRecord,
    BrokerEndpoint,
    BrokerUnavailable,
    Conflict,
    DeviceConfiguration,
    Enrolment,
    EnrolmentError,
    EnrolmentService,
    Invalid,
    NewDevice,
    NotFound,
    PatientView,
)
from services.api.service_layer.schedules import Rotation, ScheduleService
from services.api.service_layer.users import Issued, NewUser, UserRecord, UserService
from vigil.runtime import utcnow
from vigil_tools.stack.settings import StackSettings

EXIT_INVALID, EXIT_NOT_FOUND, EXIT_CONFLICT, EXIT_NO_BROKER = 2, 3, 4, 5

_DESCRIPTION = """\
Enrol a child and set up their home devices, without SQL. Every change is recorded in the
audit trail under the operator's name (--operator, default: your login name).

A typical new patient, step by step:
  1. enrol the child with their care team, weight, age (or date of birth) and cycle start;
  2. add-device the thermometer and the pump, naming the patient: each is registered, given
     its MQTT account and bound to the patient in one step, and the output is what the
     device must be configured with (the password is shown only this once);
  3. at a pump change, swap the old pump for the new one; readings are attributed to the
     patient by the device's own clock, so the old pump's last readings still count;
  4. when the bag course is over, end-infusion: the pumps are unbound and nothing about
     the infusion pages any more, while the thermometer goes on watching for fever;
  5. when the child leaves the programme, discharge with the reason: every device is
     unbound, no rule pages for the child and every open page about them is closed. The
     record, readings and alerts stay; the roster lists the child as discharged.

The care team's logins and paging, also without SQL:
  - users: list the logins, add one with its role and care teams (a password is generated
    and shown once: hand it over yourself), deactivate one (they cannot log in any more and
    every session they had open ends at once), reset-password (a new one, shown once; their
    open sessions end), set-role and set-teams (in force from their next request);
  - schedules: who is on call now and who is next, the schedules as defined, set a
    schedule's rotation (who takes turns, from which day, hand-off time, days per shift),
    add an override (someone covers a shift).

Times are ISO 8601 with a UTC offset, e.g. 2026-03-02T08:00:00+01:00 or 2026-03-02T07:00Z;
where a time is optional, the default is now."""

_EPILOG = """\
examples:
  vigil admin enrol P-0107 --team onc-north --weight-kg 18.4 --age 6 \\
      --cycle-start 2026-03-02T08:00:00+01:00 --step-up-day 8
  vigil admin add-device thermo-0107 --kind thermometer --reporting spot_check --patient P-0107
  vigil admin add-device pump-0107-a --kind pump --model "CADD-Solis" --patient P-0107
  vigil admin weight P-0107 18.9
  vigil admin add-device pump-0107-b --kind pump --team onc-north
  vigil admin swap P-0107 pump-0107-a pump-0107-b --at 2026-03-06T10:15:00+01:00
  vigil admin device-history pump-0107-a
  vigil admin end-infusion P-0107 --at 2026-03-30T09:00:00+02:00
  vigil admin discharge P-0107 --reason "course completed" --at 2026-03-30T11:00:00+02:00
  vigil admin users list --team onc-north
  vigil admin users add j.moreau --role charge_nurse --team onc-north --name "J. Moreau"
  vigil admin users deactivate j.moreau
  vigil admin users reset-password j.moreau
  vigil admin users set-role j.moreau admin
  vigil admin users set-teams j.moreau --team onc-north --team onc-south
  vigil admin schedules on-call onc-north
  vigil admin schedules set-rotation onc-north nights --participants nurse-a nurse-b \
      --start-date 2026-03-02 --handoff 20:00 --shift-days 7
  vigil admin schedules override onc-north nights nurse-c \
      --from 2026-03-05T20:00:00+01:00 --to 2026-03-06T08:00:00+01:00

exit codes: 0 done, 2 invalid request, 3 no such patient/device/care team/user/schedule,
4 refused by the registry (id or username in use, overlapping binding, already discharged at
another time, a deactivated user's password, role or teams), 5 device accounts unavailable."""


def local_broker_endpoint(settings: StackSettings) -> BrokerEndpoint:
    """Where devices reach the local stack's broker: its TLS listener and test CA."""
    from vigil_tools.stack.tls import ca_cert_file

    return BrokerEndpoint("127.0.0.1", settings.mqtt_tls_port, True, str(ca_cert_file(settings)))


def _when(text: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if parsed.utcoffset() is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a UTC offset, e.g. Z or +01:00")
    return parsed


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vigil admin",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--operator",
        default=None,
        help="your name, as recorded in the audit trail (default: your login name)",
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help="use the local stack (its database and its broker's device accounts); the "
        "default when VIGIL_PG_DSN is not set",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, example: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    enrol = add(
        "enrol",
        "enrol a child: care team, weight, age or date of birth, and the current cycle",
        "vigil admin enrol P-0107 --team onc-north --weight-kg 18.4 --age 6 "
        "--cycle-start 2026-03-02T08:00:00+01:00 --step-up-day 8",
    )
    enrol.add_argument("patient_id", help="the patient's id in Vigil (letters, digits, _ . -)")
    enrol.add_argument("--team", required=True, help="the care team's id")
    enrol.add_argument("--weight-kg", required=True, type=float, help="weight in kilograms")
    born = enrol.add_mutually_exclusive_group(required=True)
    born.add_argument("--birth-date", type=_day, help="date of birth, YYYY-MM-DD")
    born.add_argument("--age", type=int, help="age in years, when the date of birth is not given")
    enrol.add_argument(
        "--cycle-start",
        required=True,
        type=_when,
        help="start of the current blinatumomab cycle (day 1), with a UTC offset",
    )
    enrol.add_argument(
        "--step-up-day", type=int, help="the day of the dose step-up (8 in the usual schedule)"
    )

    weight = add("weight", "record a new weight", "vigil admin weight P-0107 18.9")
    weight.add_argument("patient_id")
    weight.add_argument("weight_kg", type=float, help="weight in kilograms")

    device = add(
        "add-device",
        "register a device in one step: registry entry, MQTT account and (with --patient) "
        "its binding; prints what the device must be configured with, password included "
        "(shown once)",
        "vigil admin add-device thermo-0107 --kind thermometer --patient P-0107",
    )
    device.add_argument("device_id", help="the device's id: its MQTT username and client id")
    device.add_argument("--kind", required=True, choices=["thermometer", "pump"])
    device.add_argument("--model", help="make and model, for the record")
    device.add_argument(
        "--reporting",
        choices=["continuous", "spot_check"],
        default="continuous",
        help="a thermometer read by a caregiver a few times a day is spot_check; patches, "
        "monitors and pumps are continuous (the default)",
    )
    device.add_argument("--patient", help="bind the device to this patient")
    device.add_argument("--team", help="the care team the device is for (default: the patient's)")
    device.add_argument("--from", dest="start", type=_when, help="start of the binding")

    bind = add(
        "bind",
        "bind a registered device to a patient, for a period no other binding of it overlaps",
        "vigil admin bind thermo-0107 P-0107 --from 2026-03-02T08:00:00+01:00",
    )
    bind.add_argument("device_id")
    bind.add_argument("patient_id")
    bind.add_argument("--from", dest="start", type=_when, help="start (default: now)")
    bind.add_argument("--to", dest="end", type=_when, help="end (default: open-ended)")

    unbind = add(
        "unbind",
        "end a device's binding: readings it takes afterwards are not accepted",
        "vigil admin unbind thermo-0107 --at 2026-03-30T09:00:00+02:00",
    )
    unbind.add_argument("device_id")
    unbind.add_argument("--at", type=_when, help="when the binding ends (default: now)")

    swap = add(
        "swap",
        "replace one of a patient's devices by another of the same kind (a pump change): "
        "the old binding ends at the moment the new one begins",
        "vigil admin swap P-0107 pump-0107-a pump-0107-b --at 2026-03-06T10:15:00+01:00",
    )
    swap.add_argument("patient_id")
    swap.add_argument("old_device_id")
    swap.add_argument("new_device_id")
    swap.add_argument("--at", type=_when, help="when the new device takes over (default: now)")

    history = add(
        "device-history",
        "a device's bindings and its credential events (issued, rotated, revoked)",
        "vigil admin device-history pump-0107-a",
    )
    history.add_argument("device_id")

    rotate = add(
        "rotate-credential",
        "give a device a new MQTT password (printed once); the old one stops working",
        "vigil admin rotate-credential thermo-0107",
    )
    rotate.add_argument("device_id")
    revoke = add(
        "revoke-credential",
        "delete a device's MQTT account: it is disconnected and cannot connect again",
        "vigil admin revoke-credential thermo-0107",
    )
    revoke.add_argument("device_id")

    end = add(
        "end-infusion",
        "the bag course is over: the patient's pumps are unbound at --at and the infusion "
        "rules (pump alarms, pump silent, bag change and interruption clocks) page nothing "
        "about them from then on; open pages about the pumps are closed. The thermometers "
        "stay bound: fever is still watched until discharge. Running it again changes "
        "nothing and prints the same record",
        "vigil admin end-infusion P-0107 --at 2026-03-30T09:00:00+02:00",
    )
    end.add_argument("patient_id", help="the patient's id in Vigil")
    end.add_argument(
        "--at", type=_when, help="when the pump was disconnected (default: now; not in the future)"
    )

    out = add(
        "discharge",
        "discharge the patient: every device binding still open ends at --at (ending the "
        "infusion too, if it was not recorded), no rule pages for the patient from then on "
        "(a device going quiet is not paged, a later reading is not evaluated) and every "
        "open page about them is closed with the reason 'discharged'. The record, readings, "
        "alerts and timelines stay readable. Running it again with the same reason changes "
        "nothing and prints the same record; another time or reason is refused (exit 4)",
        'vigil admin discharge P-0107 --reason "course completed" --at 2026-03-30T11:00:00+02:00',
    )
    out.add_argument("patient_id", help="the patient's id in Vigil")
    out.add_argument(
        "--reason", required=True, help="why the patient is discharged (up to 500 characters)"
    )
    out.add_argument(
        "--at", type=_when, help="when the patient was discharged (default: now; not in the future)"
    )
    _add_users(add)
    _add_schedules(add)
    return parser


def _nested(
    parent: argparse.ArgumentParser,
) -> Callable[[str, str, str], argparse.ArgumentParser]:
    actions = parent.add_subparsers(dest="action", required=True, metavar="ACTION")

    def add(name: str, help_text: str, example: str) -> argparse.ArgumentParser:
        return actions.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    return add


def _add_users(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    users = add(
        "users",
        "the care-team API's logins: list, add (with role and care teams), deactivate, "
        "reset-password, set-role, set-teams (also through the API's /api/users). Roles: "
        "clinician (reads the team's patients, acknowledges alerts), charge_nurse (also "
        "resolves alerts, changes thresholds, enrols and discharges, changes the team's "
        "paging, manages the team's clinicians and charge nurses in the API), auditor (reads "
        "patients and the audit trail), admin (all a charge nurse does but threshold changes, "
        "and the audit trail; manages the team's logins of every role in the API)",
        "vigil admin users list --team onc-north",
    )
    action = _nested(users)
    listing = action(
        "list",
        "the logins with their role, care teams and whether they are active",
        "vigil admin users list --team onc-north --all",
    )
    listing.add_argument("--team", help="only the logins of this care team")
    listing.add_argument(
        "--all", action="store_true", help="deactivated logins too (default: active only)"
    )
    new = action(
        "add",
        "add a login with its role and care teams; a password is generated and shown once "
        "(hand it to the person yourself; it is stored only as a hash)",
        'vigil admin users add j.moreau --role charge_nurse --team onc-north --name "J. Moreau"',
    )
    new.add_argument("username", help="what the person logs in with (letters, digits, _ . @ -)")
    new.add_argument("--role", required=True, choices=[r.value for r in Role])
    new.add_argument(
        "--team",
        dest="teams",
        action="append",
        required=True,
        metavar="CARE_TEAM_ID",
        help="a care team whose patients they see (repeat for several)",
    )
    new.add_argument("--name", help="the name shown for them (default: the username)")
    off = action(
        "deactivate",
        "the person can no longer log in, and every session they have open ends at once (as "
        "a logout would). Their name stays on what they did. Running it again changes nothing",
        "vigil admin users deactivate j.moreau",
    )
    off.add_argument("username")
    reset = action(
        "reset-password",
        "give an active login a new generated password, shown once; their open sessions end",
        "vigil admin users reset-password j.moreau",
    )
    reset.add_argument("username")
    role = action(
        "set-role",
        "give an active login another role, in force from their next request. Running it "
        "again changes nothing",
        "vigil admin users set-role j.moreau admin",
    )
    role.add_argument("username")
    role.add_argument("role", choices=[r.value for r in Role])
    teams = action(
        "set-teams",
        "make these an active login's care teams (all of them: the ones not named are left), "
        "in force from their next request. Running it again changes nothing",
        "vigil admin users set-teams j.moreau --team onc-north --team onc-south",
    )
    teams.add_argument("username")
    teams.add_argument(
        "--team",
        dest="teams",
        action="append",
        required=True,
        metavar="CARE_TEAM_ID",
        help="a care team whose patients they see (repeat for several)",
    )


def _add_schedules(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    schedules = add(
        "schedules",
        "a care team's on-call schedules: who is on call now and next, the schedules as "
        "defined, set a rotation, add an override. People are the team's paging people "
        "(ids as in the care-team API's /api/care-teams/{id}/people)",
        "vigil admin schedules on-call onc-north",
    )
    action = _nested(schedules)
    now = action(
        "on-call",
        "who is on call on each of the team's schedules, until when and who is next, in the "
        "team's time zone",
        "vigil admin schedules on-call onc-north --at 2026-03-05T23:00:00+01:00",
    )
    now.add_argument("care_team_id")
    now.add_argument("--at", type=_when, help="at this time instead of now")
    shown = action(
        "list",
        "the team's schedules: rotation and the overrides not yet over",
        "vigil admin schedules list onc-north",
    )
    shown.add_argument("care_team_id")
    rotation = action(
        "set-rotation",
        "create a schedule or change its rotation: the participants take turns in the order "
        "given, each for --shift-days days, handing over at --handoff (local time in "
        "--timezone), the first starting on --start-date. On an existing schedule, what you "
        "leave out stays as it is; its overrides stay too",
        "vigil admin schedules set-rotation onc-north nights --participants nurse-a nurse-b "
        "--start-date 2026-03-02 --handoff 20:00 --shift-days 7",
    )
    rotation.add_argument("care_team_id")
    rotation.add_argument("schedule_id", help="the schedule's id (a new id creates it)")
    rotation.add_argument("--name", help="the schedule's name (new: its id)")
    rotation.add_argument(
        "--timezone", help="IANA time zone of the hand-off, e.g. Europe/Paris (new: the team's)"
    )
    rotation.add_argument("--start-date", type=_day, help="YYYY-MM-DD: the first shift's day")
    rotation.add_argument("--handoff", type=_clock, help="hand-off time, HH:MM, local")
    rotation.add_argument("--shift-days", type=int, help="days per shift (new: 1)")
    rotation.add_argument(
        "--participants", nargs="+", metavar="PERSON_ID", help="people of the team, in turn order"
    )
    cover = action(
        "override",
        "a person of the team covers the schedule from --from to --to (where overrides "
        "overlap, the latest added wins)",
        "vigil admin schedules override onc-north nights nurse-c "
        "--from 2026-03-05T20:00:00+01:00 --to 2026-03-06T08:00:00+01:00",
    )
    cover.add_argument("care_team_id")
    cover.add_argument("schedule_id")
    cover.add_argument("person_id", help="who covers")
    cover.add_argument("--from", dest="start", required=True, type=_when, help="start")
    cover.add_argument("--to", dest="end", required=True, type=_when, help="end")


def _clock(text: str) -> time:
    try:
        parsed = time.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time of day (HH:MM): {text!r}") from None
    if parsed.tzinfo is not None:
        raise argparse.ArgumentTypeError("the hand-off is a local time, without an offset")
    return parsed


#: The commands of ``DischargeService``; ``users`` and ``schedules`` are ``UserService``'s and
#: ``ScheduleService``'s; the others are ``EnrolmentService``'s.
COURSE_COMMANDS = ("end-infusion", "discharge")


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _binding(b: BindingRecord) -> dict[str, Any]:
    return {
        "device_id": b.device_id,
        "patient_id": b.patient_id or None,
        "valid_from": b.valid_from,
        "valid_to": b.valid_to,
    }


def _patient(view: PatientView) -> dict[str, Any]:
    p, cycle = view.patient, view.cycle
    return {
        "patient_id": p.patient_id,
        "care_team_id": p.care_team_id,
        "weight_kg": p.weight_kg,
        "birth_date": p.birth_date,
        "age_years": p.age_years,
        "cycle_start": cycle.cycle_start if cycle else None,
        "step_up_day": cycle.step_up_day if cycle else None,
    }


def _configuration(c: DeviceConfiguration) -> dict[str, Any]:
    return {
        "client_id": c.client_id,
        "username": c.username,
        "password": c.password,
        "host": c.host,
        "port": c.port,
        "tls": c.tls,
        "ca_certificate": c.ca_certificate,
        "topic_prefix": c.topic_prefix,
        "channels": list(c.channels),
    }


async def _dispatch(service: EnrolmentService, actor: Actor, args: argparse.Namespace) -> Any:
    command = args.command
    if command == "enrol":
        return _patient(
            await service.enrol(
                actor,
                Enrolment(
                    patient_id=args.patient_id,
                    care_team_id=args.team,
                    weight_kg=args.weight_kg,
                    cycle_start=args.cycle_start,
                    step_up_day=args.step_up_day,
                    birth_date=args.birth_date,
                    age_years=args.age,
                ),
            )
        )
    if command == "weight":
        return _patient(await service.set_weight(actor, args.patient_id, args.weight_kg))
    if command == "add-device":
        done = await service.register_device(
            actor,
            NewDevice(
                device_id=args.device_id,
                kind=args.kind,
                model=args.model,
                reporting=args.reporting,
                care_team_id=args.team,
                patient_id=args.patient,
                bound_from=args.start,
            ),
        )
        return {
            "device_id": done.device.device_id,
            "kind": done.device.kind,
            "care_team_id": done.device.care_team_id,
            "binding": _binding(done.binding) if done.binding else None,
            "configure the device with": _configuration(done.configuration),
        }
    if command == "bind":
        return _binding(
            await service.bind(actor, args.device_id, args.patient_id, args.start, args.end)
        )
    if command == "unbind":
        return _binding(await service.unbind(actor, args.device_id, args.at))
    if command == "swap":
        ended, started = await service.swap(
            actor, args.patient_id, args.old_device_id, args.new_device_id, args.at
        )
        return {"ended": _binding(ended), "started": _binding(started)}
    if command == "device-history":
        found = await service.device_history(actor, args.device_id)
        d = found.device
        return {
            "device_id": d.device_id,
            "kind": d.kind,
            "model": d.model,
            "reporting": d.reporting,
            "care_team_id": d.care_team_id,
            "bindings": [_binding(b) for b in found.bindings],
            "credential_events": [
                {"action": e.action, "at": e.at} for e in found.credential_events
            ],
        }
    if command == "rotate-credential":
        return {
            "configure the device with": _configuration(
                await service.rotate_credential(actor, args.device_id)
            )
        }
    if command == "revoke-credential":
        await service.revoke_credential(actor, args.device_id)
        return {"device_id": args.device_id, "credential": "revoked"}
    raise AssertionError(command)  # pragma: no cover - the parser offers only the above


def _outcome(done: Outcome) -> dict[str, Any]:
    r = done.record
    return {
        "patient_id": r.patient_id,
        "care_team_id": r.care_team_id,
        "status": r.status,
        "infusion_ended_at": r.infusion_ended_at,
        "discharged_at": r.discharged_at,
        "discharge_reason": r.discharge_reason,
        "discharged_by": r.discharged_by,
        "devices_unbound": [
            {"device_id": b.device_id, "kind": b.kind, "valid_to": b.valid_to} for b in done.ended
        ],
        "escalations_closed": done.escalations_closed,
        "changed": done.changed,
    }


async def _dispatch_course(
    service: DischargeService, actor: Actor, args: argparse.Namespace
) -> Any:
    if args.command == "end-infusion":
        return _outcome(await service.end_infusion(actor, args.patient_id, args.at))
    return _outcome(await service.discharge(actor, args.patient_id, args.reason, args.at))


def _user(u: UserRecord) -> dict[str, Any]:
    return {
        "username": u.username,
        "name": u.display_name,
        "role": u.role.value,
        "care_teams": ", ".join(u.care_teams),
        "active": u.active,
        "user_id": u.user_id,
        "sessions_ended_at": u.sessions_revoked_at,
    }


def _issued(done: Issued) -> dict[str, Any]:
    return {**_user(done.user), "password (shown once)": done.password}


async def _dispatch_users(service: UserService, actor: Actor, args: argparse.Namespace) -> Any:
    action = args.action
    if action == "list":
        found = await service.list(actor, care_team=args.team, include_inactive=args.all)
        return {"users": [_user(u) for u in found]}
    if action == "add":
        return _issued(
            await service.add(
                actor, NewUser(args.username, Role(args.role), tuple(args.teams), args.name)
            )
        )
    if action == "deactivate":
        user, changed = await service.deactivate(actor, args.username)
        return {**_user(user), "changed": changed}
    if action == "set-role":
        user, changed = await service.set_role(actor, args.username, Role(args.role))
        return {**_user(user), "changed": changed}
    if action == "set-teams":
        user, changed = await service.set_care_teams(actor, args.username, args.teams)
        return {**_user(user), "changed": changed}
    return _issued(await service.reset_password(actor, args.username))


def _schedule(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "schedule_id": s["schedule_id"],
        "name": s["name"],
        "timezone": s["timezone"],
        "start_date": s["start_date"],
        "handoff_time": s["handoff_time"].strftime("%H:%M"),
        "shift_days": s["shift_days"],
        "participants": ", ".join(s["participants"]),
        "overrides": [
            {
                "person_id": o["person_id"],
                "from": o["starts_at"],
                "to": o["ends_at"],
                "override_id": str(o["override_id"]),
            }
            for o in s.get("overrides", ())
        ],
    }


async def _dispatch_schedules(
    service: ScheduleService, actor: Actor, args: argparse.Namespace
) -> Any:
    action = args.action
    if action == "on-call":
        found = await service.on_call(actor, args.care_team_id, args.at)
        return {
            "care_team_id": found.care_team_id,
            "at": found.at_local,
            "schedules": [
                {
                    "schedule": f"{s.name} ({s.schedule_id})",
                    "on call": _who(s.person_id, s.person_name) or "nobody",
                    "until": s.until_local or "-",
                    "next": _who(s.next_person_id, s.next_person_name) or "-",
                }
                for s in found.schedules
            ],
        }
    if action == "list":
        return {
            "schedules": [_schedule(s) for s in await service.schedules(actor, args.care_team_id)]
        }
    if action == "set-rotation":
        participants = tuple(args.participants) if args.participants else None
        return _schedule(
            await service.set_rotation(
                actor,
                args.care_team_id,
                args.schedule_id,
                Rotation(
                    name=args.name,
                    timezone=args.timezone,
                    start_date=args.start_date,
                    handoff_time=args.handoff,
                    shift_days=args.shift_days,
                    participants=participants,
                ),
            )
        )
    override_id = await service.add_override(
        actor, args.care_team_id, args.schedule_id, args.person_id, args.start, args.end
    )
    return {
        "override_id": str(override_id),
        "schedule_id": args.schedule_id,
        "person_id": args.person_id,
        "from": args.start,
        "to": args.end,
    }


def _who(person_id: str | None, name: str | None) -> str | None:
    if person_id is None:
        return None
    return person_id if not name else f"{name} ({person_id})"


def _print(result: Any, as_json: bool, indent: str = "") -> None:
    if as_json:
        print(json.dumps(_plain(result), indent=2))
        return
    for key, value in _plain(result).items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print(value, False, indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{indent}{key}:")
            for item in value:
                print(indent + "  - " + ", ".join(f"{k}={v}" for k, v in item.items()))
        else:
            shown = "-" if value is None else value
            print(f"{indent}{key}: {shown}")


async def _run(
    args: argparse.Namespace, dsn: str, service_of: Callable[[asyncpg.Pool], EnrolmentService]
) -> Any:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        operator = args.operator or getpass.getuser()
        actor = Actor(f"operator:{operator}", None)
        if args.command == "users":
            from services.api.adapters.credentials import hash_password
            from services.api.adapters.users import PostgresUserStore

            users = UserService(PostgresUserStore(pool), hash_password, utcnow)
            return await _dispatch_users(users, actor, args)
        if args.command == "schedules":
            from services.notify.public import TeamRegistry

            schedules = ScheduleService(TeamRegistry(pool, utcnow), AuditTrail(pool), utcnow)
            return await _dispatch_schedules(schedules, actor, args)
        if args.command in COURSE_COMMANDS:
            from services.notify.public import PatientEscalations

            course = DischargeService(
                PostgresDischargeStore(pool), AuditTrail(pool), utcnow, PatientEscalations(pool)
            )
            return await _dispatch_course(course, actor, args)
        return await _dispatch(service_of(pool), actor, args)
    finally:
        await pool.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    local = args.local or "VIGIL_PG_DSN" not in os.environ
    endpoint: BrokerEndpoint | None = None
    broker = None
    if local:
        from vigil_tools.stack import stack_env
        from vigil_tools.stack.accounts import LocalStackBroker

        stack = StackSettings()
        if not stack.marker_file.exists():
            print(
                f"vigil admin: no local stack in {stack.data_dir} (`vigil stack up`), "
                "and VIGIL_PG_DSN is not set",
                file=sys.stderr,
            )
            return EXIT_NO_BROKER
        dsn = stack_env(stack)["VIGIL_PG_DSN"]
        broker = LocalStackBroker(stack)
        endpoint = local_broker_endpoint(stack)
    else:
        from vigil.settings import PostgresSettings

        dsn = PostgresSettings().dsn

    def service_of(pool: asyncpg.Pool) -> EnrolmentService:
        return EnrolmentService(
            PostgresRegistryStore(pool), AuditTrail(pool), utcnow, broker=broker, endpoint=endpoint
        )

    try:
        result = asyncio.run(_run(args, dsn, service_of))
    except EnrolmentError as error:
        code = {
            Invalid: EXIT_INVALID,
            NotFound: EXIT_NOT_FOUND,
            Conflict: EXIT_CONFLICT,
            BrokerUnavailable: EXIT_NO_BROKER,
        }.get(type(error), 1)
        print(f"vigil admin {args.command}: {error}", file=sys.stderr)
        return code
    _print(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
