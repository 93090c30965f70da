"""Ingest's own MQTT 5 inbound path: packet framing, PUBLISH decoding, and the hand-off of every
other packet to paho, against a fake paho client (the real broker path is covered by the ingest
integration and crash tests)."""

from __future__ import annotations

import asyncio
import struct
import threading
from collections import deque
from typing import Any

import paho.mqtt.client as paho_mqtt
import pytest
from paho.mqtt.enums import MQTTErrorCode

from services.ingest.adapters.mqtt_inbound import (
    PAHO_INTERNALS,
    Inbox,
    MalformedPacket,
    decode_publish,
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


class FakePaho:
    """What ``Inbox`` uses of paho's client: its socket reads, keep-alive clock and handlers."""

    def __init__(self, reads: list[bytes | type[BaseException]]) -> None:
        self._sock: object | None = object()
        self._reads = deque(reads)
        self._msgtime_mutex = threading.Lock()
        self._last_bytes_received = 0.0
        self._in_packet: dict[str, Any] = {}
        self.handled: list[tuple[object, bytes]] = []
        self.rc_handled: list[MQTTErrorCode] = []
        self.loop_read = None

    def _sock_recv(self, bufsize: int) -> bytes:
        if not self._reads:
            raise BlockingIOError
        item = self._reads.popleft()
        if isinstance(item, type):
            raise item
        return item

    def _packet_handle(self) -> MQTTErrorCode:
        self.handled.append((self._in_packet["command"], bytes(self._in_packet["packet"])))
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _loop_rc_handle(self, rc: MQTTErrorCode) -> MQTTErrorCode:
        self.rc_handled.append(rc)
        return rc


def _inbox(paho: FakePaho) -> Inbox:
    inbox = Inbox()
    inbox.install(paho)  # type: ignore[arg-type]
    assert paho.loop_read == inbox.loop_read
    return inbox


def test_publish_split_across_reads_arrives_once_and_in_order() -> None:
    """A PUBLISH cut between two socket reads is delivered once, complete, after the one before
    it; a SUBACK between them goes to paho's own handler with its body intact."""
    one = publish("vigil/v1/dev/d1/temperature", b"1", mid=1)
    two = publish("vigil/v1/dev/d1/temperature", b"2" * 200, mid=2)
    paho = FakePaho([one + SUBACK + two[:10]])
    inbox = _inbox(paho)
    assert inbox.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert inbox.take(10) == [("vigil/v1/dev/d1/temperature", b"1", 1)]
    assert paho.handled == [(0x90, SUBACK[2:])]
    assert paho._in_packet["command"] == 0  # reset for paho, as its own reader leaves it
    paho._reads.append(two[10:])
    inbox.loop_read()
    assert inbox.take(10) == [("vigil/v1/dev/d1/temperature", b"2" * 200, 2)]
    assert paho._last_bytes_received > 0  # keep-alive sees the traffic


def test_take_respects_the_limit_and_keeps_the_rest() -> None:
    """``take`` returns at most ``limit`` messages, oldest first, and keeps the others."""
    paho = FakePaho([b"".join(publish("t/a", b"p", mid=m) for m in range(1, 6))])
    inbox = _inbox(paho)
    inbox.loop_read()
    assert [m[2] for m in inbox.take(3)] == [1, 2, 3]
    assert len(inbox) == 2
    assert [m[2] for m in inbox.take(3)] == [4, 5]


def test_closed_socket_delivers_what_arrived_then_reports_the_loss() -> None:
    """When the broker closes the connection, complete messages already read are kept (they are
    made durable before reconnecting) and paho is told the connection is lost."""
    paho = FakePaho([publish("t/a", b"p", mid=9), b""])
    inbox = _inbox(paho)
    assert inbox.loop_read() == MQTTErrorCode.MQTT_ERR_CONN_LOST
    assert paho.rc_handled == [MQTTErrorCode.MQTT_ERR_CONN_LOST]
    assert inbox.take(10) == [("t/a", b"p", 9)]


def test_qos2_publish_is_a_protocol_error() -> None:
    """The subscription is QoS 1, so a QoS 2 PUBLISH breaks the protocol: the connection is
    dropped (the broker redelivers) rather than the message taken without its QoS 2 handshake."""
    paho = FakePaho([publish("t/a", b"p", qos=2)])
    inbox = _inbox(paho)
    assert inbox.loop_read() == MQTTErrorCode.MQTT_ERR_PROTOCOL
    assert len(inbox) == 0


def test_a_new_connection_drops_the_partial_packet_of_the_old_one() -> None:
    """Bytes of a packet cut by a reconnect are not glued to the new connection's stream."""
    whole = publish("t/a", b"p", mid=3)
    paho = FakePaho([whole[:5]])
    inbox = _inbox(paho)
    inbox.loop_read()
    paho._sock = object()
    paho._reads.append(whole)
    inbox.loop_read()
    assert inbox.take(10) == [("t/a", b"p", 3)]


async def test_wait_returns_when_a_message_arrives() -> None:
    """A waiting batcher wakes on arrival, and cancelling a wait loses no message."""
    paho = FakePaho([])
    inbox = _inbox(paho)
    loop = asyncio.get_running_loop()
    paho._reads.append(publish("t/a", b"p", mid=4))
    loop.call_later(0.01, inbox.loop_read)
    started = loop.time()
    await inbox.wait(set(), 5.0)
    assert loop.time() - started < 5.0
    assert inbox.take(10) == [("t/a", b"p", 4)]
    waiting = asyncio.ensure_future(inbox.wait(set(), 5.0))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    paho._reads.append(publish("t/a", b"q", mid=5))
    inbox.loop_read()
    assert inbox.take(10) == [("t/a", b"q", 5)]


def test_installed_paho_has_the_reader_state_the_inbox_uses() -> None:
    """The Inbox uses private members of paho's client; an upgrade that drops one must fail
    here (and at ingest start-up), not misread packets in production."""
    client = paho_mqtt.Client(paho_mqtt.CallbackAPIVersion.VERSION2, protocol=paho_mqtt.MQTTv5)
    assert [name for name in PAHO_INTERNALS if not hasattr(client, name)] == []
    Inbox().install(client)  # does not raise
    assert client.loop_read.__self__.__class__ is Inbox  # type: ignore[attr-defined]
