"""Ingest's MQTT 5 packet codec: framing, PUBLISH decoding, and the packets ingest sends and reads
(the connection itself: test_ingest_mqtt_session.py; against Mosquitto: the ingest integration
tests)."""

from __future__ import annotations

import struct

import pytest

from services.ingest.adapters.mqtt_codec import (
    MalformedPacket,
    decode_connack,
    decode_disconnect,
    decode_properties,
    decode_puback,
    decode_publish,
    decode_suback,
    encode_connect,
    encode_pubacks,
    encode_publish,
    encode_subscribe,
    encode_variable_int,
    reason_name,
    split_packets,
)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: str, payload: bytes, mid: int = 7, qos: int = 1, props: bytes = b"") -> bytes:
    body = struct.pack("!H", len(topic)) + topic.encode()
    if qos:
        body += struct.pack("!H", mid)
    body += _varint(len(props)) + props + payload
    return bytes([0x30 | (qos << 1)]) + _varint(len(body)) + body


SUBACK = bytes([0x90, 4, 0, 1, 0, 1])  # packet id 1, no properties, granted QoS 1


def test_split_packets_leaves_an_incomplete_packet_for_the_next_read() -> None:
    """Complete packets are returned with the bytes they span; a packet cut short is not."""
    first = publish("vigil/v1/dev/d1/temperature", b"x" * 300)  # two-byte remaining length
    second = publish("vigil/v1/dev/d2/temperature", b"{}")
    buffer = first + second[:-1]
    packets, consumed = split_packets(buffer)
    assert consumed == len(first)
    assert [p[0] for p in packets] == [0x32]
    packets, consumed = split_packets(buffer + second[-1:])
    assert consumed == len(first) + len(second)
    assert len(packets) == 2


def test_split_packets_handles_an_empty_body_and_a_cut_length() -> None:
    """A zero-length packet (PINGRESP) is complete; a remaining length cut mid-way is not."""
    packets, consumed = split_packets(b"\xd0\x00" + b"\x30\x80")
    assert packets == [(0xD0, b"")]
    assert consumed == 2


def test_split_packets_refuses_a_length_of_more_than_four_bytes() -> None:
    """Five continuation bytes are a protocol violation, not a packet still arriving."""
    with pytest.raises(MalformedPacket):
        split_packets(b"\x30\x80\x80\x80\x80\x01")


def test_decode_publish_skips_properties_and_keeps_the_payload_whole() -> None:
    """Topic, packet id and payload are exact; MQTT 5 properties before the payload are skipped."""
    props = b"\x01\x01" + b"\x03" + struct.pack("!H", 16) + b"application/json"
    [(first, body)], _ = split_packets(publish("a/b", b'{"v":1}', mid=513, props=props))
    assert decode_publish(first, body) == ("a/b", b'{"v":1}', 513, 1)


def test_decode_publish_qos0_has_no_packet_id() -> None:
    """A QoS 0 PUBLISH carries no packet id; it is reported as 0 (nothing to acknowledge)."""
    [(first, body)], _ = split_packets(publish("a/b", b"p", qos=0))
    assert decode_publish(first, body) == ("a/b", b"p", 0, 0)


@pytest.mark.parametrize(
    "body",
    [b"\x00", b"\x00\x05ab", b"\x00\x01a\x00", b"\x00\x01a\x00\x00\x00"],
    ids=["no-topic-length", "topic-cut", "packet-id-cut", "packet-id-zero"],
)
def test_decode_publish_refuses_truncated_packets(body: bytes) -> None:
    """A PUBLISH too short for its own fields is malformed, never decoded into garbage."""
    with pytest.raises(MalformedPacket):
        decode_publish(0x32, body)


@pytest.mark.parametrize("value", [0, 127, 128, 16_383, 16_384, 2_097_151, 268_435_455])
def test_variable_int_round_trips_at_every_length(value: int) -> None:
    """The encoder writes what the framing reads back, at each of the four lengths."""
    assert encode_variable_int(value) == _varint(value)
    if value < 20_000:
        packet = b"\x30" + encode_variable_int(value) + b"x" * value
        packets, consumed = split_packets(packet)
        assert consumed == len(packet) and len(packets[0][1]) == value


def test_connect_asks_for_a_persistent_session_with_credentials() -> None:
    """CONNECT, MQTT 5: clean start off, user name and password flags, keep-alive, session
    expiry and receive maximum properties, then client id, user name and password."""
    packet = encode_connect(
        client_id="vigil-ingest-1",
        username="vigil-ingest",
        password="secret",
        keepalive_s=30,
        session_expiry_s=604_800,
        receive_maximum=2000,
    )
    [(first, body)], consumed = split_packets(packet)
    assert (first, consumed) == (0x10, len(packet))
    assert body[:7] == b"\x00\x04MQTT\x05"
    flags, keepalive = body[7], struct.unpack("!H", body[8:10])[0]
    assert flags == 0x80 | 0x40  # user name, password; clean start (0x02) off
    assert keepalive == 30
    properties, pos = decode_properties(body, 10)
    assert properties == {0x11: 604_800, 0x21: 2000}
    fields = []
    while pos < len(body):
        size = struct.unpack("!H", body[pos : pos + 2])[0]
        fields.append(body[pos + 2 : pos + 2 + size].decode())
        pos += 2 + size
    assert fields == ["vigil-ingest-1", "vigil-ingest", "secret"]


def test_connect_without_credentials_sets_no_flags() -> None:
    packet = encode_connect(
        client_id="c",
        username=None,
        password=None,
        keepalive_s=5,
        session_expiry_s=60,
        receive_maximum=10,
        clean_start=True,
    )
    assert packet[2 + 7] == 0x02


def test_subscribe_puback_and_publish_bytes() -> None:
    """The packets ingest writes, byte for byte as MQTT 5 lays them out."""
    assert encode_subscribe(1, "a/#", 1) == b"\x82\x09\x00\x01\x00\x00\x03a/#\x01"
    assert encode_pubacks([1, 258]) == b"\x40\x02\x00\x01\x40\x02\x01\x02"
    publish_packet = encode_publish("t/a", b"{}", 7)
    [(first, body)], _ = split_packets(publish_packet)
    assert decode_publish(first, body) == ("t/a", b"{}", 7, 1)


def test_connack_reason_and_properties() -> None:
    """Session present, the reason code, and properties of each kind a broker sends."""
    props = (
        b"\x21\x03\xe8"  # receive maximum 1000
        + b"\x13\x00\x3c"  # server keep alive 60
        + b"\x27\x00\x10\x00\x00"  # maximum packet size
        + b"\x12\x00\x02id"  # assigned client identifier
        + b"\x26\x00\x01k\x00\x01v"  # user property
        + b"\x2a\x01"  # shared subscription available
    )
    connack = decode_connack(b"\x01\x00" + _varint(len(props)) + props)
    assert connack.session_present and connack.reason_code == 0
    assert connack.properties[0x21] == 1000 and connack.properties[0x13] == 60
    assert connack.properties[0x12] == "id" and connack.properties[0x26] == ("k", "v")
    refused = decode_connack(b"\x00\x87\x00")
    assert (refused.session_present, refused.reason_code) == (False, 0x87)
    assert reason_name(refused.reason_code) == "Not authorized"


def test_unknown_or_cut_properties_are_malformed() -> None:
    with pytest.raises(MalformedPacket):
        decode_properties(b"\x02\x7f\x00", 0)  # no property 0x7f
    with pytest.raises(MalformedPacket):
        decode_properties(b"\x03\x1f\x00\x05", 0)  # a reason string cut short
    with pytest.raises(MalformedPacket):
        decode_properties(b"\x05\x21", 0)  # list longer than the packet


def test_suback_puback_and_disconnect() -> None:
    assert decode_suback(b"\x00\x01\x00\x01") == (1, [1])
    assert decode_suback(b"\x00\x02\x00\x87") == (2, [0x87])
    assert decode_puback(b"\x01\x02") == (258, 0)
    assert decode_puback(b"\x01\x02\x87\x00") == (258, 0x87)
    assert decode_disconnect(b"") == (0, None)
    assert decode_disconnect(b"\x8e\x06\x1f\x00\x03bye") == (0x8E, "bye")
    assert reason_name(0x8E) == "Session taken over"
