"""The MQTT 5 packets ingest exchanges with the broker, encoded and decoded: pure functions, no I/O.

Only what ingest's subscriber needs (``mqtt_session`` uses them): CONNECT out and CONNACK in,
SUBSCRIBE out and SUBACK in, PUBLISH in (QoS 0 or 1) and PUBACK out, PUBLISH out at QoS 1 (the
answers to devices) and its PUBACK in, PINGREQ out and PINGRESP in, DISCONNECT both ways.

PUBLISH decoding is the hot path (thousands of messages a second): a general MQTT library builds a
``Properties`` object and a message object per PUBLISH, which was more than half of ingest's CPU
per reading. Here a PUBLISH becomes ``(topic, payload, packet id, QoS)`` and its properties are
skipped: ingest uses none, and announces no ``TopicAliasMaximum``, so every PUBLISH the broker
sends carries its topic.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

CONNECT = 0x10
CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
SUBSCRIBE = 0x82  # the fixed header's reserved flags of SUBSCRIBE are 0b0010
SUBACK = 0x90
PINGREQ = 0xC0
PINGRESP = 0xD0
DISCONNECT = 0xE0

PINGREQ_PACKET = bytes((PINGREQ, 0))
# Normal disconnection (reason 0, no properties: both may be left out). The session is kept.
DISCONNECT_PACKET = bytes((DISCONNECT, 0))

# Property identifiers used by ingest.
SESSION_EXPIRY_INTERVAL = 0x11
ASSIGNED_CLIENT_IDENTIFIER = 0x12
SERVER_KEEP_ALIVE = 0x13
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21

_PUBACK = struct.Struct("!BBH")

# Property identifier -> how its value is encoded (MQTT 5.0, section 2.2.2.2).
_BYTE, _TWO, _FOUR, _VARINT, _STRING, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES = {
    0x01: _BYTE, 0x02: _FOUR, 0x03: _STRING, 0x08: _STRING, 0x09: _BINARY, 0x0B: _VARINT,
    0x11: _FOUR, 0x12: _STRING, 0x13: _TWO, 0x15: _STRING, 0x16: _BINARY, 0x17: _BYTE,
    0x18: _FOUR, 0x19: _BYTE, 0x1A: _STRING, 0x1C: _STRING, 0x1F: _STRING, 0x21: _TWO,
    0x22: _TWO, 0x23: _TWO, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _FOUR, 0x28: _BYTE,
    0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip

# Reason codes (MQTT 5.0, section 2.4) with the names brokers and client libraries print.
REASONS = {
    0x00: "Success",
    0x04: "Disconnect with will message",
    0x80: "Unspecified error",
    0x81: "Malformed packet",
    0x82: "Protocol error",
    0x83: "Implementation specific error",
    0x84: "Unsupported protocol version",
    0x85: "Client identifier not valid",
    0x86: "Bad user name or password",
    0x87: "Not authorized",
    0x88: "Server unavailable",
    0x89: "Server busy",
    0x8A: "Banned",
    0x8B: "Server shutting down",
    0x8C: "Bad authentication method",
    0x8D: "Keep alive timeout",
    0x8E: "Session taken over",
    0x8F: "Topic filter invalid",
    0x90: "Topic name invalid",
    0x91: "Packet identifier in use",
    0x93: "Receive maximum exceeded",
    0x94: "Topic alias invalid",
    0x95: "Packet too large",
    0x96: "Message rate too high",
    0x97: "Quota exceeded",
    0x98: "Administrative action",
    0x99: "Payload format invalid",
    0x9A: "Retain not supported",
    0x9B: "QoS not supported",
    0x9C: "Use another server",
    0x9D: "Server moved",
    0x9E: "Shared subscriptions not supported",
    0x9F: "Connection rate exceeded",
    0xA0: "Maximum connect time",
    0xA1: "Subscription identifiers not supported",
    0xA2: "Wildcard subscriptions not supported",
}


def reason_name(code: int) -> str:
    return REASONS.get(code, f"reason 0x{code:02x}")


class MalformedPacket(ValueError):
    """Bytes from the broker that are not a valid MQTT packet; the connection must be dropped."""


def _variable_int(data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    """MQTT variable byte integer at ``pos``: (value, position after it), None if incomplete."""
    if pos < len(data) and data[pos] < 0x80:
        return data[pos], pos + 1  # one byte: an empty property list, a packet under 128 bytes
    if pos + 1 < len(data) and data[pos + 1] < 0x80:
        # Two bytes: a packet of 128 bytes to 16 KiB (a device reading's PUBLISH).
        return (data[pos] & 0x7F) | (data[pos + 1] << 7), pos + 2
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


def encode_variable_int(value: int) -> bytes:
    if not 0 <= value <= 268_435_455:
        raise ValueError(f"{value} does not fit an MQTT variable byte integer")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


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


def _string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    if len(raw) > 0xFFFF:
        raise ValueError("MQTT strings are at most 65,535 bytes")
    return struct.pack("!H", len(raw)) + raw


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_variable_int(len(body)) + body


def encode_connect(
    *,
    client_id: str,
    username: str | None,
    password: str | None,
    keepalive_s: int,
    session_expiry_s: int,
    receive_maximum: int,
    clean_start: bool = False,
) -> bytes:
    """CONNECT, MQTT 5: the persistent session ingest relies on (clean start off, an expiry) and
    how many unacknowledged QoS 1 messages the broker may have in flight to this client."""
    flags = 0x02 if clean_start else 0
    if username is not None:
        flags |= 0x80
        if password is not None:
            flags |= 0x40
    properties = struct.pack("!BIBH", SESSION_EXPIRY_INTERVAL, session_expiry_s,
                             RECEIVE_MAXIMUM, receive_maximum)  # fmt: skip
    body = bytearray(_string("MQTT"))
    body += struct.pack("!BBH", 5, flags, keepalive_s)
    body += encode_variable_int(len(properties)) + properties
    body += _string(client_id)
    if username is not None:
        body += _string(username)
        if password is not None:
            body += _string(password)
    return _packet(CONNECT, bytes(body))


def encode_subscribe(packet_id: int, topic_filter: str, qos: int) -> bytes:
    """SUBSCRIBE to one filter: no properties; options = the maximum QoS only."""
    body = struct.pack("!HB", packet_id, 0) + _string(topic_filter) + bytes((qos & 0x03,))
    return _packet(SUBSCRIBE, body)


def encode_pubacks(packet_ids: Iterable[int]) -> bytes:
    """One PUBACK per packet id, back to back: two bytes long, which in MQTT 5 means "success"."""
    pack = _PUBACK.pack
    return b"".join(pack(PUBACK, 2, mid) for mid in packet_ids)


def encode_publish(topic: str, payload: bytes, packet_id: int) -> bytes:
    """A QoS 1 PUBLISH (not retained, no properties)."""
    body = _string(topic) + struct.pack("!HB", packet_id, 0) + payload
    return _packet(PUBLISH | 0x02, body)


def decode_properties(data: bytes, pos: int) -> tuple[dict[int, object], int]:
    """The property list at ``pos``: {identifier: value} (a user property's value is a pair;
    repeated ones keep the last) and the position after the list."""
    length = _variable_int(data, pos)
    if length is None:
        raise MalformedPacket("property length truncated")
    size, pos = length
    end = pos + size
    if end > len(data):
        raise MalformedPacket("properties truncated")
    found: dict[int, object] = {}
    while pos < end:
        identifier = data[pos]
        kind = _PROPERTY_TYPES.get(identifier)
        pos += 1
        value: object
        if kind == _BYTE:
            value, pos = data[pos], pos + 1
        elif kind == _TWO:
            value, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        elif kind == _FOUR:
            value, pos = int.from_bytes(data[pos : pos + 4], "big"), pos + 4
        elif kind == _VARINT:
            decoded = _variable_int(data, pos)
            if decoded is None:
                raise MalformedPacket("property truncated")
            value, pos = decoded
        elif kind in (_STRING, _BINARY):
            value, pos = _read_string(data, pos, end, text=kind == _STRING)
        elif kind == _PAIR:
            name, pos = _read_string(data, pos, end, text=True)
            pair_value, pos = _read_string(data, pos, end, text=True)
            value = (name, pair_value)
        else:
            raise MalformedPacket(f"unknown property 0x{identifier:02x}")
        if pos > end:
            raise MalformedPacket("property truncated")
        found[identifier] = value
    return found, end


def _read_string(data: bytes, pos: int, end: int, *, text: bool) -> tuple[str | bytes, int]:
    if pos + 2 > end:
        raise MalformedPacket("string length truncated")
    stop = pos + 2 + int.from_bytes(data[pos : pos + 2], "big")
    if stop > end:
        raise MalformedPacket("string truncated")
    raw = data[pos + 2 : stop]
    return (raw.decode("utf-8", "replace") if text else raw), stop


@dataclass(frozen=True, slots=True)
class Connack:
    session_present: bool
    reason_code: int
    properties: dict[int, object] = field(default_factory=dict)


def decode_connack(body: bytes) -> Connack:
    if len(body) < 2:
        raise MalformedPacket("CONNACK truncated")
    properties: dict[int, object] = {}
    if len(body) > 2:
        properties, _ = decode_properties(body, 2)
    return Connack(bool(body[0] & 0x01), body[1], properties)


def decode_suback(body: bytes) -> tuple[int, list[int]]:
    """Packet id and the reason code per filter (0-2: the QoS granted; 0x80 and up: refused)."""
    if len(body) < 3:
        raise MalformedPacket("SUBACK truncated")
    _, pos = decode_properties(body, 2)
    return int.from_bytes(body[:2], "big"), list(body[pos:])


def decode_puback(body: bytes) -> tuple[int, int]:
    """Packet id and reason code (absent means success) of a PUBACK."""
    if len(body) < 2:
        raise MalformedPacket("PUBACK truncated")
    return int.from_bytes(body[:2], "big"), body[2] if len(body) > 2 else 0


def decode_disconnect(body: bytes) -> tuple[int, str | None]:
    """Reason code (absent means normal disconnection) and reason string of a DISCONNECT."""
    if not body:
        return 0, None
    reason_string = None
    if len(body) > 1:
        properties, _ = decode_properties(body, 1)
        text = properties.get(REASON_STRING)
        reason_string = text if isinstance(text, str) else None
    return body[0], reason_string
