"""Inbound MQTT for ingest: reads the broker's PUBLISH packets without paho's per-message path.

Under load the largest single cost of ingest was paho decoding each PUBLISH: it builds a full
MQTT 5 ``Properties`` object (dozens of attribute writes and string operations) per message, then
an ``MQTTMessage``, a debug log call, aiomqtt's ``Message`` and an ``asyncio.Queue`` hand-off:
about half of ingest's CPU time per reading. This module owns that path instead:

- ``split_packets`` and ``decode_publish`` are pure framing and decoding of MQTT 5 packets;
- ``Inbox`` replaces ``loop_read`` on the paho client that aiomqtt wraps. It reads whatever the
  socket holds in large chunks, decodes PUBLISH packets itself into ``(topic, payload, mid)`` in a
  deque, and gives every other packet (CONNACK, SUBACK, PINGRESP, DISCONNECT, ...) to paho's
  own handler unchanged, so connection, subscription and keep-alive stay paho's and aiomqtt's.

What it relies on, and why that holds for ingest: the subscription is QoS 1, so the broker sends
QoS 0 or 1 only (a QoS 2 PUBLISH is a protocol error and drops the connection, after which the
broker redelivers); ingest announces no ``TopicAliasMaximum``, so the broker sends no topic
aliases and every PUBLISH carries its topic. Properties of a PUBLISH are skipped: ingest uses none.
Acknowledgement stays manual and is the caller's (``services.ingest.app``).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

import paho.mqtt.client as paho_mqtt
from paho.mqtt.enums import MQTTErrorCode

# One PUBLISH as ingest uses it: topic, payload, packet id (0 for QoS 0, which needs no PUBACK).
InboundMessage = tuple[str, bytes, int]

_PUBLISH = 0x30
_READ_CHUNK = 256 * 1024
# Bytes read per readable-socket event before yielding to the event loop, so a flood cannot
# starve the batches being made durable; the socket stays readable and is read again next turn
# (over TLS, aiomqtt calls ``loop_read`` again while the TLS layer holds decrypted bytes).
_READ_LIMIT = 4 * 1024 * 1024


#: The private members of ``paho.mqtt.client.Client`` this module uses.
PAHO_INTERNALS = (
    "_sock",
    "_sock_recv",
    "_msgtime_mutex",
    "_last_bytes_received",
    "_loop_rc_handle",
    "_in_packet",
    "_packet_handle",
)


class MalformedPacket(ValueError):
    """Bytes from the broker that are not a valid MQTT packet; the connection must be dropped."""


def _variable_int(data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    """MQTT variable byte integer at ``pos``: (value, position after it), None if incomplete."""
    if pos < len(data) and data[pos] < 0x80:
        return data[pos], pos + 1  # one byte: an empty property list, a packet under 128 bytes
    value = 0
    shift = 0
    for i in range(pos, min(pos + 4, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    if len(data) - pos >= 4:
        raise MalformedPacket("variable byte integer longer than 4 bytes")
    return None


def split_packets(buffer: bytes | bytearray) -> tuple[list[tuple[int, bytes]], int]:
    """The complete packets at the start of ``buffer`` as (first byte, body), and how many bytes
    they span; an incomplete packet at the end is left for the next read."""
    packets: list[tuple[int, bytes]] = []
    pos = 0
    end = len(buffer)
    # A view copies each body once; released on return so the caller may resize ``buffer``.
    with memoryview(buffer) as view:
        while pos + 2 <= end:
            length = _variable_int(buffer, pos + 1)
            if length is None:
                break
            size, body_start = length
            body_end = body_start + size
            if body_end > end:
                break
            packets.append((buffer[pos], view[body_start:body_end].tobytes()))
            pos = body_end
    return packets, pos


def decode_publish(first_byte: int, body: bytes) -> tuple[str, bytes, int, int]:
    """Topic, payload, packet id and QoS of an MQTT 5 PUBLISH body (properties skipped)."""
    qos = (first_byte >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    if len(body) < 2:
        raise MalformedPacket("PUBLISH shorter than its topic length")
    topic_end = 2 + ((body[0] << 8) | body[1])
    mid = 0
    pos = topic_end
    if qos:
        mid = (body[pos] << 8) | body[pos + 1] if pos + 2 <= len(body) else -1
        pos += 2
    properties = _variable_int(body, pos) if pos <= len(body) else None
    if mid < 0 or properties is None or properties[1] + properties[0] > len(body):
        raise MalformedPacket("PUBLISH truncated")
    if qos and mid == 0:
        raise MalformedPacket("QoS 1 PUBLISH with packet id 0")
    topic = body[2:topic_end].decode("utf-8", "replace")
    return topic, body[properties[1] + properties[0] :], mid, qos


class Inbox:
    """Messages read from one broker connection, in arrival order, waiting to be batched.

    ``install`` puts ``loop_read`` in place on the paho client before it connects; aiomqtt calls
    it whenever the socket is readable. Nothing here takes a message out except ``take``, and
    waiting (``wait``) holds no message, so cancelling a wait can never lose one.
    """

    def __init__(self) -> None:
        self._messages: collections.deque[InboundMessage] = collections.deque()
        self._buffer = bytearray()
        self._socket: object | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paho: paho_mqtt.Client | None = None

    def install(self, paho: paho_mqtt.Client) -> None:
        # This reader leans on paho's private reader state (pinned to paho-mqtt 2.2 in
        # pyproject.toml). Refuse to start on a paho that lacks it rather than misread packets.
        missing = [name for name in PAHO_INTERNALS if not hasattr(paho, name)]
        if missing:
            raise RuntimeError(f"this paho-mqtt lacks {missing}")
        self._paho = paho
        paho.loop_read = self.loop_read  # type: ignore[method-assign]

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

    async def wait(self, others: set[asyncio.Future[None]], timeout_s: float) -> None:
        """Return when a message is waiting, one of ``others`` is done, or after ``timeout_s``."""
        if self._messages:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await asyncio.wait({waiter, *others}, timeout=timeout_s, return_when="FIRST_COMPLETED")
        finally:
            self._waiter = None
            waiter.cancel()

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """Read what the socket holds (up to ``_READ_LIMIT``) and decode every complete packet."""
        del max_packets  # paho ignores it as well
        paho = self._paho
        assert paho is not None, "install() first"
        if paho._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        if paho._sock is not self._socket:
            # A new connection: a partial packet of the old one means nothing on this one.
            self._socket = paho._sock
            self._buffer.clear()
        buffer = self._buffer
        read = 0
        lost = False
        while read < _READ_LIMIT:
            try:
                chunk = paho._sock_recv(_READ_CHUNK)
            except BlockingIOError:
                break
            except (OSError, ConnectionError):
                lost = True
                break
            if not chunk:
                lost = True
                break
            buffer += chunk
            read += len(chunk)
        if read:
            with paho._msgtime_mutex:
                paho._last_bytes_received = time.monotonic()
        rc = self._decode(paho)
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and lost:
            rc = MQTTErrorCode.MQTT_ERR_CONN_LOST
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return paho._loop_rc_handle(rc)
        return rc

    def _decode(self, paho: paho_mqtt.Client) -> MQTTErrorCode:
        try:
            packets, consumed = split_packets(self._buffer)
        except MalformedPacket:
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        del self._buffer[:consumed]
        arrived = False
        append = self._messages.append
        for first_byte, body in packets:
            if first_byte & 0xF0 == _PUBLISH:
                try:
                    topic, payload, mid, qos = decode_publish(first_byte, body)
                except MalformedPacket:
                    return MQTTErrorCode.MQTT_ERR_PROTOCOL
                if qos == 2:
                    return MQTTErrorCode.MQTT_ERR_PROTOCOL  # more than the subscription allows
                append((topic, payload, mid))
                arrived = True
                continue
            rc = _hand_to_paho(paho, first_byte, body)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
        if arrived and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


def _hand_to_paho(paho: paho_mqtt.Client, first_byte: int, body: bytes) -> MQTTErrorCode:
    """Let paho handle a complete non-PUBLISH packet exactly as its own reader would."""
    paho._in_packet = {
        "command": first_byte,
        "have_remaining": 1,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": len(body),
        "packet": bytearray(body),
        "to_process": 0,
        "pos": 0,
    }
    handle: Callable[[], MQTTErrorCode] = paho._packet_handle
    try:
        rc = handle()
    except Exception:  # paho's MalformedPacket and decoding errors
        rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
    paho._in_packet = {
        "command": 0,
        "have_remaining": 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": 0,
        "packet": bytearray(b""),
        "to_process": 0,
        "pos": 0,
    }
    return rc
