"""``vigil audit``: list the audit log, or verify its hash chain.

    vigil audit list [--since T] [--until T] [--actor A] [--kind K] [--subject S] [--json]
    vigil audit verify [--expect-head HASH] [--json]

``verify`` exits 0 when every row links to the one before it, 1 at the first broken row (which
it names), 2 on a usage or connection error. Reads ``VIGIL_PG_DSN``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime
from typing import Any, TextIO

import asyncpg

from vigil.audit.store import list_entries, verify
from vigil.settings import PostgresSettings


def _aware(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset (e.g. 2026-01-01T00:00Z)")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vigil audit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="entries in chain order, filtered")
    listing.add_argument("--since", type=_aware, help="at or after this time (with offset)")
    listing.add_argument("--until", type=_aware, help="before this time (with offset)")
    listing.add_argument("--actor")
    listing.add_argument("--kind", help="action, exact or dotted prefix (e.g. 'replay')")
    listing.add_argument("--subject")
    listing.add_argument("--limit", type=int, default=1000)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    check = sub.add_parser("verify", help="walk the hash chain; report the first broken row")
    check.add_argument(
        "--expect-head", help="the head hash recorded earlier: also detects a truncated tail"
    )
    check.add_argument("--json", action="store_true")
    return parser


async def _run(args: argparse.Namespace, dsn: str, out: TextIO) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        if args.command == "list":
            entries = await list_entries(
                conn,
                since=args.since,
                until=args.until,
                actor=args.actor,
                kind=args.kind,
                subject=args.subject,
                limit=args.limit,
            )
            for entry in entries:
                if args.json:
                    out.write(json.dumps(entry.as_dict(), ensure_ascii=False) + "\n")
                else:
                    details = json.dumps(dict(entry.details), ensure_ascii=False, sort_keys=True)
                    out.write(
                        f"{entry.seq:>6}  {entry.at.isoformat()}  {entry.actor:<16} "
                        f"{entry.action:<20} {entry.subject}  {details}\n"
                    )
            return 0
        result = await verify(conn, expected_head=args.expect_head)
        report: dict[str, Any] = result.as_dict()
        if args.json:
            out.write(json.dumps(report) + "\n")
        elif result.ok:
            out.write(
                f"audit chain OK: {result.rows} rows, head seq {result.head_seq} "
                f"hash {result.head_hash}\n"
            )
        else:
            assert result.broken is not None
            out.write(
                f"audit chain BROKEN at seq {result.broken.seq}: {result.broken.reason} "
                f"({result.rows} rows verified before it)\n"
            )
        return 0 if result.ok else 1
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_run(args, PostgresSettings().dsn, sys.stdout))
    except (OSError, asyncpg.PostgresError) as error:
        print(f"vigil audit: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
