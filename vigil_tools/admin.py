"""``vigil admin``: enrol children, onboard their devices, end their infusion and discharge them
from the command line, over the same use cases as the care-team API
(``services.api.service_layer.enrolment`` and ``discharge``), each change written to the audit
trail under the operator's name.

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
from datetime import date, datetime
from typing import Any

import asyncpg

from services.api.adapters.audit import AuditTrail
from services.api.adapters.discharge import PostgresDischargeStore
from services.api.adapters.enrolment import PostgresRegistryStore
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

exit codes: 0 done, 2 invalid request, 3 no such patient/device/care team,
4 refused by the registry (id in use, overlapping binding, already discharged at another
time), 5 device accounts unavailable."""


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
    return parser


#: The commands of ``DischargeService``; the others are ``EnrolmentService``'s.
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
