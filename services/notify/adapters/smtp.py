"""Sending one page e-mail over SMTP with the standard library, off the event loop.

Owns the SMTP conversation (EHLO, optional STARTTLS and login, MAIL, RCPT, DATA) and turns every
failure into a ``SendOutcome`` carrying the server's reply or the connection error; it never
raises for a delivery problem and never logs the message (it is PHI). Retrying is not its job.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.generator import BytesGenerator
from email.message import EmailMessage
from io import BytesIO

from services.notify.service_layer.ports import SendOutcome


class SmtpSender:
    """Hands messages to one SMTP relay; one connection per message (pages are rare)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        envelope_from: str,
        timeout_s: float = 10.0,
        starttls: bool = False,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._envelope_from = envelope_from
        self._timeout_s = timeout_s
        self._starttls = starttls
        self._username = username
        self._password = password

    async def send(self, message: EmailMessage, *, recipient: str) -> SendOutcome:
        # smtplib blocks; a worker thread keeps the consumer and the retry loop responsive.
        return await asyncio.to_thread(self._send_blocking, message, recipient)

    def _send_blocking(self, message: EmailMessage, recipient: str) -> SendOutcome:
        payload = _wire_bytes(message)
        smtp = smtplib.SMTP(timeout=self._timeout_s)
        try:
            smtp.connect(self._host, self._port)
            smtp.ehlo_or_helo_if_needed()
            if self._starttls:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if self._username is not None and self._password is not None:
                smtp.login(self._username, self._password)
            code, reply = smtp.mail(self._envelope_from)
            if code != 250:
                return _refused("sender refused", code, reply)
            code, reply = smtp.rcpt(recipient)
            if code not in (250, 251):
                return _refused("recipient refused", code, reply)
            code, reply = smtp.data(payload)
            if code != 250:
                return _refused("message refused", code, reply)
            return SendOutcome(accepted=True, detail=_reply(code, reply), reply_code=code)
        except smtplib.SMTPResponseException as exc:
            return _refused("smtp error", exc.smtp_code, exc.smtp_error)
        except (smtplib.SMTPException, OSError) as exc:
            # OSError covers refused connections, timeouts and TLS failures: all worth a retry.
            return SendOutcome(accepted=False, detail=f"{type(exc).__name__}: {exc}")
        finally:
            _close(smtp)


def _wire_bytes(message: EmailMessage) -> bytes:
    buffer = BytesIO()
    # CRLF line ends as SMTP wants them; smtplib.data() does not rewrite bytes payloads.
    BytesGenerator(buffer, policy=message.policy.clone(linesep="\r\n")).flatten(message)
    return buffer.getvalue()


def _reply(code: int, reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return f"{code} {text}".strip()


def _refused(what: str, code: int, reply: bytes | str) -> SendOutcome:
    return SendOutcome(accepted=False, detail=f"{what}: {_reply(code, reply)}", reply_code=code)


def _close(smtp: smtplib.SMTP) -> None:
    # QUIT after an accepted DATA must not turn a delivered page into a failure (and a resend).
    try:
        if smtp.sock is not None:
            smtp.quit()
    except (smtplib.SMTPException, OSError):
        pass
    finally:
        smtp.close()
