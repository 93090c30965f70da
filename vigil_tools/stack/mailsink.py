"""The stack's SMTP sink program: where the pages of a local run end up, one ``.eml`` per message.

Run as ``python -m vigil_tools.stack.mailsink --host 127.0.0.1 --port N --dir DIR``;
:mod:`vigil_tools.stack.mail` launches it as a component of the stack. It accepts every message (no
relay, no authentication: it only listens on loopback and delivers nowhere) and writes each one
atomically, so a reader globbing ``*.eml`` never sees half a message.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
import uuid
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Final

from aiosmtpd.smtp import SMTP, Envelope, Session

from vigil_tools.stack.process import write_file

log = logging.getLogger("vigil.stack.mailsink")

# Pages are short; anything near this is a bug worth seeing as a refusal rather than a 1 GB file.
_DATA_SIZE_LIMIT: Final = 32 * 1024 * 1024


def message_file_name(received_at: datetime) -> str:
    """Sortable by arrival, unique even for two messages in the same microsecond."""
    return f"{received_at:%Y%m%dT%H%M%S.%fZ}-{uuid.uuid4().hex[:8]}.eml"


class MaildirHandler:
    """aiosmtpd handler storing each message as ``<dir>/<timestamp>-<id>.eml``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def handle_DATA(  # the name aiosmtpd dispatches to
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        del server
        content = envelope.original_content or b""
        # The envelope is not part of the message; keep it, since a page's recipients can be Bcc.
        envelope_headers = (
            f"X-Vigil-Envelope-From: {envelope.mail_from or ''}\r\n"
            f"X-Vigil-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n"
            f"X-Vigil-Peer: {session.peer}\r\n"
        ).encode()
        received_at = datetime.now(UTC)
        path = self.directory / message_file_name(received_at)
        write_file(path, envelope_headers + content, mode=0o644)
        subject = BytesHeaderParser().parsebytes(content).get("Subject", "")
        log.info(
            "stored %s from=%s to=%s subject=%r bytes=%d",
            path.name,
            envelope.mail_from,
            ",".join(envelope.rcpt_tos),
            str(subject),
            len(content),
        )
        return "250 Message accepted for delivery"


async def serve(host: str, port: int, directory: Path) -> None:
    """Serve until SIGTERM or SIGINT."""
    handler = MaildirHandler(directory)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            handler,
            hostname="vigil-mailsink",  # skips a reverse DNS lookup that can stall in containers
            enable_SMTPUTF8=True,
            data_size_limit=_DATA_SIZE_LIMIT,
        ),
        host=host,
        port=port,
        reuse_address=True,
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("mail sink listening on %s:%d, writing to %s", host, port, directory)
    async with server:
        await stop.wait()
    log.info("mail sink stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vigil_tools.stack.mailsink", description=__doc__
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True, dest="directory")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter(
        "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
    )
    formatter.converter = time.gmtime  # UTC, like the Kafka and PostgreSQL logs
    handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # aiosmtpd logs every connection and command at INFO; one line per stored message is ours.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    directory: Path = args.directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(args.host, args.port, directory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
