"""Local stand-ins for the providers notify pages through, and a clock to move by hand.

For tests and the benchmark only: ``TwilioLikeServer`` speaks Twilio's Messages resource (form
POST with basic auth, JSON answer with ``sid``/``status``, the list endpoint used to reconcile)
and can post Twilio-shaped status callbacks; ``PagerDutyLikeServer`` speaks Events API v2
(``POST /v2/enqueue``, 202 ``{status, message, dedup_key}``) and folds events by ``dedup_key``.
Both listen on 127.0.0.1 in a thread (``http.server``), so they work under any event loop.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


class ManualClock:
    """An injected clock that moves only when a test says so."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


@dataclass
class _Recorded:
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _BurstServer(ThreadingHTTPServer):
    # The default listen backlog (5) resets connections under a burst of pages.
    request_queue_size = 1024


class _LocalServer:
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = _BurstServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.owner = self  # type: ignore[attr-defined]  # reached from the handler
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> Any:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))


class TwilioLikeServer(_LocalServer):
    """Twilio's ``/2010-04-01/Accounts/{Sid}/Messages.json``: create and list messages.

    ``respond`` decides the answer to each create: ``(http_status, twilio_status_or_error)``;
    the default accepts every message with status ``queued``.
    """

    def __init__(self, account_sid: str = "AC" + "0" * 32, auth_token: str = "secret") -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.messages: list[dict[str, Any]] = []
        self.create_calls = 0
        self.respond: Callable[[dict[str, str]], tuple[int, str]] = lambda form: (201, "queued")
        self._lock = threading.Lock()
        super().__init__(_TwilioHandler)

    def sent_to(self, number: str) -> list[dict[str, Any]]:
        with self._lock:
            return [m for m in self.messages if m["to"] == number]


class _TwilioHandler(_Handler):
    @property
    def owner(self) -> TwilioLikeServer:
        owner: TwilioLikeServer = self.server.owner  # type: ignore[attr-defined]
        return owner

    def _authorised(self) -> bool:
        expected = base64.b64encode(
            f"{self.owner.account_sid}:{self.owner.auth_token}".encode()
        ).decode()
        return self.headers.get("Authorization") == f"Basic {expected}"

    def _path_ok(self) -> bool:
        path = urlparse(self.path).path
        return path == f"/2010-04-01/Accounts/{self.owner.account_sid}/Messages.json"

    def do_POST(self) -> None:
        if not self._path_ok():
            self._reply(404, {"code": 20404, "message": "not found", "status": 404})
            return
        if not self._authorised():
            self._reply(401, {"code": 20003, "message": "Authenticate", "status": 401})
            return
        form = {k: v[0] for k, v in parse_qs(self._body().decode()).items()}
        owner = self.owner
        with owner._lock:
            owner.create_calls += 1
        code, status = owner.respond(form)
        if code >= 400:
            self._reply(code, {"code": 21211, "message": status, "status": code})
            return
        message = {
            "sid": "SM" + uuid.uuid4().hex,
            "account_sid": owner.account_sid,
            "to": form.get("To"),
            "from": form.get("From"),
            "body": form.get("Body"),
            "status": status,
            "status_callback": form.get("StatusCallback"),
            "date_created": datetime.now().astimezone().isoformat(),
        }
        with owner._lock:
            owner.messages.append(message)
        self._reply(code, message)

    def do_GET(self) -> None:
        if not self._path_ok() or not self._authorised():
            self._reply(404, {"code": 20404, "message": "not found", "status": 404})
            return
        query = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
        with self.owner._lock:
            found = [m for m in self.owner.messages if m["to"] == query.get("To", m["to"])]
        self._reply(200, {"messages": list(reversed(found)), "page": 0})


class PagerDutyLikeServer(_LocalServer):
    """Events API v2: every event is kept; ``incidents`` folds them by ``dedup_key``."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.respond: Callable[[dict[str, Any]], int] = lambda event: 202
        self._lock = threading.Lock()
        super().__init__(_PagerDutyHandler)

    @property
    def incidents(self) -> dict[str, str]:
        """dedup_key -> last event_action, as PagerDuty would hold them."""
        with self._lock:
            return {e["dedup_key"]: e["event_action"] for e in self.events}


class _PagerDutyHandler(_Handler):
    def do_POST(self) -> None:
        owner: PagerDutyLikeServer = self.server.owner  # type: ignore[attr-defined]
        if urlparse(self.path).path != "/v2/enqueue":
            self._reply(404, {"status": "not found"})
            return
        try:
            event = json.loads(self._body())
            if event.get("event_action") not in ("trigger", "acknowledge", "resolve"):
                raise ValueError("event_action")
            if not event.get("routing_key"):
                raise ValueError("routing_key")
            if event["event_action"] == "trigger":
                payload = event["payload"]
                for key in ("summary", "severity", "source"):
                    if not payload.get(key):
                        raise ValueError(key)
        except (ValueError, KeyError, TypeError) as exc:
            self._reply(400, {"status": "invalid event", "message": f"bad {exc}"})
            return
        code = owner.respond(event)
        if code != 202:
            self._reply(code, {"status": "error", "message": "try again"})
            return
        event.setdefault("dedup_key", uuid.uuid4().hex)
        with owner._lock:
            owner.events.append(event)
        self._reply(
            202,
            {"status": "success", "message": "Event processed", "dedup_key": event["dedup_key"]},
        )


class SmtpSink:
    """A real SMTP server (aiosmtpd, own thread) that keeps every message it accepts.

    Addresses in ``refuse`` get a permanent 550, as a relay answers an unknown mailbox.
    """

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.received: list[tuple[list[str], bytes]] = []
        self.refuse: set[str] = set()
        self._lock = threading.Lock()
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.bind(("127.0.0.1", 0))
        self.port: int = probe.getsockname()[1]
        probe.close()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    # Hook names are aiosmtpd's (handle_<SMTP verb>).
    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if address in self.refuse:
            return "550 5.1.1 Recipient address rejected"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            self.received.append((list(envelope.rcpt_tos), bytes(envelope.content)))
        return "250 2.0.0 Ok: queued"

    def to(self, address: str) -> list[bytes]:
        with self._lock:
            return [content for rcpts, content in self.received if address in rcpts]

    def __enter__(self) -> SmtpSink:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.support.notify pagerduty``: serve a PagerDuty-shaped endpoint in its
    own process (the benchmark uses it so the server does not share the measured process)."""
    import sys
    import time

    args = sys.argv[1:] if argv is None else argv
    if args != ["pagerduty"]:
        print("usage: python -m tests.support.notify pagerduty", file=sys.stderr)
        return 2
    with PagerDutyLikeServer() as server:
        print(server.url, flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    raise SystemExit(main())
