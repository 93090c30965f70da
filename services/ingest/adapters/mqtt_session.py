"""Ingest's connection to the broker: a minimal MQTT 5 client on an asyncio protocol, no library.

Only what ingest needs, built on ``mqtt_codec``: CONNECT with clean start off, a session expiry,
a receive maximum and the service account's credentials (over TLS when a CA file is given);
SUBSCRIBE to one filter at QoS 1; QoS 0/1 PUBLISH in, kept in arrival order until taken; PUBACK
out when the caller says so, a whole batch in one write (acknowledgement is manual: only after
Kafka and PostgreSQL have the message); QoS 1 PUBLISH out for the answers to devices, within the
broker's receive maximum; PINGREQ every keep-alive interval, the connection dropped when the
broker sent nothing since the previous one; DISCONNECT in and out. Reconnection is the caller's
(a new ``MqttSession`` per connection; the broker's session carries the messages across).

Why not a client library: one decoded every PUBLISH into a full MQTT 5 ``Properties`` object and
a message object (about half of ingest's CPU per reading under load, docs/perf), and taking that
path out of a library meant relying on its private reader state. Here the bytes read from the
socket are split into packets and a PUBLISH becomes ``(topic, payload, packet id)`` directly.

What it relies on: the subscription is QoS 1, so the broker sends QoS 0 or 1 (a QoS 2 PUBLISH is
a protocol error: the connection is dropped and the broker redelivers); ingest announces no
``TopicAliasMaximum``, so every PUBLISH carries its topic; PUBLISH properties are ignored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.ingest.adapters.mqtt_codec import (
    CONNACK,
    DISCONNECT,
    DISCONNECT_PACKET,
    PINGREQ_PACKET,
    PINGRESP,
    PUBACK,
    PUBLISH,
    RECEIVE_MAXIMUM,
    SERVER_KEEP_ALIVE,
    SUBACK,
    Connack,
    MalformedPacket,
    decode_connack,
    decode_disconnect,
    decode_puback,
    decode_publish,
    decode_suback,
    encode_connect,
    encode_pubacks,
    encode_publish,
    encode_subscribe,
    reason_name,
    split_packets,
)
from services.ingest.service_layer.ports import InboundMessage


class MqttError(Exception):
    """The broker connection could not be made, was refused, or was lost."""


@dataclass(frozen=True, slots=True)
class SessionOptions:
    host: str
    port: int
    client_id: str
    username: str | None
    password: str | None
    keepalive_s: int
    session_expiry_s: int
    # How many unacknowledged QoS 1 messages the broker may have in flight to this client.
    receive_maximum: int
    tls_ca_file: Path | None = None
    # For the TCP (and TLS) connection, the CONNACK and the SUBACK each.
    timeout_s: float = 10.0


class MqttSession(asyncio.Protocol):
    """One connection to the broker. ``open`` connects; messages wait in arrival order until
    ``take``; waiting (``wait``) holds no message, so cancelling a wait can never lose one."""

    def __init__(self, options: SessionOptions) -> None:
        loop = asyncio.get_running_loop()
        self._options = options
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._messages: collections.deque[InboundMessage] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.disconnected: asyncio.Future[None] = loop.create_future()
        self.lost_reason: str | None = None
        self._connack: asyncio.Future[Connack] = loop.create_future()
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self._last_received = loop.time()
        self._keepalive_s = options.keepalive_s
        self._pinger: asyncio.Task[None] | None = None
        # QoS 1 messages out: packet ids awaiting PUBACK, and those waiting for a free slot.
        self._send_quota = 65535
        self._in_flight: set[int] = set()
        self._queued: collections.deque[tuple[str, bytes]] = collections.deque()
        self._next_id = 1
        # Packets written during one turn of the event loop go to the socket in one write at
        # its end (see ``_write``).
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self.publishes_refused = 0  # PUBACKs with a failure reason (e.g. not authorised)

    # --- connecting ------------------------------------------------------------------------

    @classmethod
    async def open(cls, options: SessionOptions) -> MqttSession:
        """Connect and wait for the broker's CONNACK; raises MqttError (refused, timed out) or
        OSError (unreachable, TLS failure)."""
        session = cls(options)
        context = None
        if options.tls_ca_file is not None:
            context = ssl.create_default_context(cafile=str(options.tls_ca_file))
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: session,
                    options.host,
                    options.port,
                    ssl=context,
                    server_hostname=options.host if context is not None else None,
                ),
                options.timeout_s,
            )
        except TimeoutError:
            raise MqttError(f"connecting to {options.host}:{options.port} timed out") from None
        try:
            connack = await asyncio.wait_for(session._connack, options.timeout_s)
        except TimeoutError:
            session._drop("no CONNACK from the broker")
            raise MqttError("no CONNACK from the broker") from None
        except MqttError:
            session._drop("connection lost before CONNACK")
            raise
        if connack.reason_code >= 0x80:
            reason = f"[code:{connack.reason_code}] {reason_name(connack.reason_code)}"
            session._drop(f"connection refused: {reason}")
            raise MqttError(f"connection refused: {reason}")
        receive_maximum = connack.properties.get(RECEIVE_MAXIMUM)
        if isinstance(receive_maximum, int) and receive_maximum > 0:
            session._send_quota = receive_maximum
        keepalive = connack.properties.get(SERVER_KEEP_ALIVE)
        if isinstance(keepalive, int):
            session._keepalive_s = keepalive  # the broker's value overrides ours
        session._pinger = asyncio.create_task(session._keep_alive())
        return session

    async def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        """Subscribe and return the QoS granted; raises MqttError when refused or lost."""
        packet_id = self._allocate_id()
        answer: asyncio.Future[list[int]] = self._loop.create_future()
        self._subacks[packet_id] = answer
        try:
            self._write(encode_subscribe(packet_id, topic_filter, qos))
            try:
                codes = await asyncio.wait_for(answer, self._options.timeout_s)
            except TimeoutError:
                raise MqttError(f"no SUBACK for {topic_filter}") from None
        finally:
            self._subacks.pop(packet_id, None)
        if not codes or codes[0] >= 0x80:
            code = codes[0] if codes else 0x80
            raise MqttError(f"subscription to {topic_filter} refused: {reason_name(code)}")
        return codes[0]

    # --- inbound messages ------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._messages)

    def take(self, limit: int) -> list[InboundMessage]:
        """Up to ``limit`` messages, oldest first."""
        messages = self._messages
        if len(messages) <= limit:
            taken = list(messages)
            messages.clear()
            return taken
        return [messages.popleft() for _ in range(limit)]

    async def wait(self, timeout_s: float) -> None:
        """Return when a message is waiting, the connection is lost, or after ``timeout_s``."""
        if self._messages or self.disconnected.done():
            return
        waiter = self._loop.create_future()
        self._waiter = waiter
        try:
            await asyncio.wait(
                {waiter, self.disconnected}, timeout=timeout_s, return_when="FIRST_COMPLETED"
            )
        finally:
            self._waiter = None
            waiter.cancel()

    def ack(self, packet_ids: Sequence[int]) -> None:
        """PUBACK these messages, in this order, with one write. QoS 0 messages (packet id 0)
        need none. On a lost connection nothing is sent: the broker redelivers them."""
        mids = [mid for mid in packet_ids if mid]
        if mids and self.connected:
            self._write(encode_pubacks(mids))

    # --- outbound messages -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self.disconnected.done()

    def publish(self, topic: str, payload: bytes) -> bool:
        """Publish with QoS 1 (queued while the broker's receive maximum is reached); False when
        not connected. Unacknowledged ones are not sent again on another connection."""
        if not self.connected:
            return False
        if len(self._in_flight) < self._send_quota:
            self._send(topic, payload)
        else:
            self._queued.append((topic, payload))
        return True

    def backlog(self) -> int:
        """QoS 1 messages published and not yet acknowledged by the broker, queued ones included."""
        return len(self._in_flight) + len(self._queued)

    def _send(self, topic: str, payload: bytes) -> None:
        packet_id = self._allocate_id()
        self._in_flight.add(packet_id)
        self._write(encode_publish(topic, payload, packet_id))

    def _allocate_id(self) -> int:
        while True:
            packet_id = self._next_id
            self._next_id = packet_id % 65535 + 1
            if packet_id not in self._in_flight and packet_id not in self._subacks:
                return packet_id

    # --- closing ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Send DISCONNECT (normal: the broker keeps the session) and close the connection."""
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger
        transport = self._transport
        if transport is None or self.disconnected.done():
            return
        self.lost_reason = self.lost_reason or "closed by ingest"
        self._flush()
        transport.write(DISCONNECT_PACKET)
        transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.disconnected), self._options.timeout_s)
        except TimeoutError:
            transport.abort()

    def _drop(self, reason: str) -> None:
        """End the connection after a protocol violation or a failed handshake."""
        if self.lost_reason is None:
            self.lost_reason = reason
        if self._transport is not None and not self.disconnected.done():
            self._flush()
            self._transport.close()

    def _write(self, data: bytes) -> None:
        """Queue a packet for the socket; the packets of one event-loop turn (the answers to
        every device, one PUBLISH each, every 100 ms) go out in one system call, in order."""
        if self._transport is None or self.disconnected.done():
            raise MqttError(self.lost_reason or "not connected to the broker")
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if out and self._transport is not None and not self.disconnected.done():
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    async def _keep_alive(self) -> None:
        """PINGREQ every keep-alive interval; drop the connection when the broker sent nothing
        at all (no PINGRESP, no message) in the interval after the previous one."""
        interval = self._keepalive_s
        if interval <= 0:
            return
        while not self.disconnected.done():
            sent_at = self._loop.time()
            self._write(PINGREQ_PACKET)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.disconnected), interval)
                return
            if self._last_received < sent_at:
                self._drop(f"keep-alive: nothing from the broker for {interval} s")
                return

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        options = self._options
        transport.write(
            encode_connect(
                client_id=options.client_id,
                username=options.username,
                password=options.password,
                keepalive_s=options.keepalive_s,
                session_expiry_s=options.session_expiry_s,
                receive_maximum=options.receive_maximum,
            )
        )

    def data_received(self, data: bytes) -> None:
        self._last_received = self._loop.time()
        buffer = self._buffer
        buffer += data
        try:
            packets, consumed = split_packets(buffer)
        except MalformedPacket as error:
            self._drop(f"malformed packet from the broker: {error}")
            return
        del buffer[:consumed]
        arrived = False
        append = self._messages.append
        for first_byte, body in packets:
            kind = first_byte & 0xF0
            try:
                if kind == PUBLISH:
                    topic, payload, mid, qos = decode_publish(first_byte, body)
                    if qos == 2:  # more than the subscription allows
                        raise MalformedPacket("QoS 2 PUBLISH on a QoS 1 subscription")
                    append((topic, payload, mid))
                    arrived = True
                elif kind == PUBACK:
                    self._acknowledged(*decode_puback(body))
                elif kind == PINGRESP:
                    pass
                elif kind == CONNACK:
                    if not self._connack.done():
                        self._connack.set_result(decode_connack(body))
                elif kind == SUBACK:
                    packet_id, codes = decode_suback(body)
                    answer = self._subacks.get(packet_id)
                    if answer is not None and not answer.done():
                        answer.set_result(codes)
                elif kind == DISCONNECT:
                    code, text = decode_disconnect(body)
                    detail = f": {text}" if text else ""
                    self._drop(f"disconnected by the broker: {reason_name(code)}{detail}")
                    break
                else:
                    raise MalformedPacket(f"unexpected packet type 0x{kind:02x}")
            except MalformedPacket as error:
                self._drop(f"protocol error: {error}")
                break
        if arrived and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _acknowledged(self, packet_id: int, reason_code: int) -> None:
        if packet_id not in self._in_flight:
            return
        self._in_flight.discard(packet_id)
        if reason_code >= 0x80:
            self.publishes_refused += 1
        if self._queued and len(self._in_flight) < self._send_quota:
            self._send(*self._queued.popleft())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost_reason is None:
            self.lost_reason = (
                f"connection lost: {exc!r}" if exc else "connection closed by the broker"
            )
        if not self.disconnected.done():
            self.disconnected.set_result(None)
        error = MqttError(self.lost_reason)
        if not self._connack.done():
            self._connack.set_exception(error)
        for answer in self._subacks.values():
            if not answer.done():
                answer.set_exception(error)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
