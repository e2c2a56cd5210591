"""The SOCKS4/4a codec and the SOCKS5 UDP header: wire bytes built by hand."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socksd.socks4 import Socks4ServerConnection
from socksd.socks5 import (
    NEED_DATA,
    AddressType,
    Command,
    CommandReply,
    CommandRequest,
    ConnectionClosed,
    LocalProtocolError,
    MethodSelection,
    ProtocolError,
    Reply,
    Socks5ServerConnection,
    State,
)
from socksd.socks5_udp import encode_udp_header, parse_udp_datagram


def _v4(cd: int, port: int, ip: bytes, userid: bytes, host: bytes | None = None) -> bytes:
    out = bytes([4, cd]) + struct.pack(">H", port) + ip + userid + b"\x00"
    return out + (host + b"\x00" if host is not None else b"")


def test_socks4_connect_and_reply():
    c = Socks4ServerConnection()
    c.receive_data(_v4(1, 80, bytes([93, 184, 216, 34]), b"alice") + b"GET /")
    ev = c.next_event()
    assert ev == CommandRequest(Command.CONNECT, AddressType.IPV4, "93.184.216.34", 80)
    assert c.userid == b"alice"
    assert c.trailing_data == b"GET /"
    assert c.next_event() is NEED_DATA
    wire = c.send(CommandReply(Reply.SUCCEEDED, "192.0.2.1", 4242))
    assert wire == bytes([0, 90]) + struct.pack(">H", 4242) + bytes([192, 0, 2, 1])
    assert c.state is State.RELAYING


def test_socks4a_hostname_byte_by_byte():
    whole = _v4(1, 443, b"\x00\x00\x00\x07", b"", b"example.com")
    c = Socks4ServerConnection()
    events = []
    for b in whole:
        c.receive_data(bytes([b]))
        ev = c.next_event()
        if ev is not NEED_DATA:
            events.append(ev)
    assert events == [CommandRequest(Command.CONNECT, AddressType.DOMAINNAME, "example.com", 443)]


def test_socks4_receive_is_receive_data_then_next_event():
    whole = _v4(1, 443, b"\x00\x00\x00\x07", b"bob", b"example.com") + b"early"
    c = Socks4ServerConnection()
    assert c.receive(whole[:5]) is NEED_DATA
    ev = c.receive(whole[5:])
    assert ev == CommandRequest(Command.CONNECT, AddressType.DOMAINNAME, "example.com", 443)
    assert (c.userid, c.trailing_data) == (b"bob", b"early")


def test_socks4_send_success_is_send_of_a_success_reply():
    fast, slow = Socks4ServerConnection(), Socks4ServerConnection()
    for c in (fast, slow):
        c.receive(_v4(1, 80, bytes([10, 0, 0, 1]), b""))
    assert fast.send_success("192.0.2.7", 4242) == slow.send(
        CommandReply(Reply.SUCCEEDED, "192.0.2.7", 4242)
    )
    assert fast.state is slow.state is State.RELAYING


def test_socks4_failure_reply_closes():
    c = Socks4ServerConnection()
    c.receive_data(_v4(1, 80, bytes([10, 0, 0, 1]), b""))
    c.next_event()
    assert c.send(CommandReply(Reply.NOT_ALLOWED))[:2] == bytes([0, 91])
    assert c.state is State.CLOSED


def test_socks4_bind_two_replies():
    c = Socks4ServerConnection()
    c.receive_data(_v4(2, 21, bytes([192, 0, 2, 9]), b"u"))
    assert c.next_event().command is Command.BIND
    first = c.send(CommandReply(Reply.SUCCEEDED, "192.0.2.1", 5000, interim=True))
    assert first[:2] == bytes([0, 90]) and c.state is State.SEND_REPLY
    c.send(CommandReply(Reply.SUCCEEDED, "192.0.2.9", 6000))
    assert c.state is State.RELAYING
    with pytest.raises(LocalProtocolError):
        c.send(CommandReply(Reply.SUCCEEDED))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (bytes([5, 1]), "bad_version"),
        (bytes([4, 3]), "unknown_command"),
        (_v4(1, 80, b"\x01\x02\x03\x04", b"x" * 300), "userid_too_long"),
        (_v4(1, 80, b"\x00\x00\x00\x01", b"", b"bad name"), "bad_domain_name"),
    ],
)
def test_socks4_protocol_errors(data, reason):
    c = Socks4ServerConnection()
    c.receive_data(data)
    with pytest.raises(ProtocolError) as err:
        c.next_event()
    assert err.value.reason == reason


def test_socks4_eof_mid_request():
    c = Socks4ServerConnection()
    c.receive_data(bytes([4, 1, 0]))
    c.receive_data(b"")
    assert isinstance(c.next_event(), ConnectionClosed)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
def test_socks4_any_input_any_chunking(data, chunk):
    def run(step):
        c = Socks4ServerConnection(max_buffer=1024)
        out = []
        try:
            for i in range(0, len(data), step):
                c.receive_data(data[i : i + step])
                ev = c.next_event()
                out.append(ev)
                if ev is not NEED_DATA:
                    break
        except ProtocolError as exc:
            out.append(exc.reason)
        return [e for e in out if e is not NEED_DATA]

    assert run(len(data) or 1) == run(chunk)


def test_socks5_bind_interim_reply():
    c = Socks5ServerConnection()
    c.receive_data(b"\x05\x01\x00")
    c.next_event()
    c.send(MethodSelection(0))
    c.receive_data(b"\x05\x02\x00\x01\xc0\x00\x02\x09\x00\x15")
    assert c.next_event().command is Command.BIND
    c.send(CommandReply(Reply.SUCCEEDED, "192.0.2.1", 5000, interim=True))
    assert c.state is State.SEND_REPLY
    with pytest.raises(LocalProtocolError):
        c.send(CommandReply(Reply.GENERAL_FAILURE, interim=True))
    c.send(CommandReply(Reply.SUCCEEDED, "192.0.2.9", 6000))
    assert c.state is State.RELAYING


# -- UDP header ----------------------------------------------------------------------------


def test_udp_ipv4_roundtrip():
    d = parse_udp_datagram(b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35" + b"query")
    assert (d.frag, d.address_type, d.host, d.port, bytes(d.data)) == (
        0,
        AddressType.IPV4,
        "127.0.0.1",
        53,
        b"query",
    )
    assert encode_udp_header("127.0.0.1", 53) == b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35"


def test_udp_ipv6_and_domain():
    d = parse_udp_datagram(b"\x00\x00\x00\x04" + bytes(15) + b"\x01" + b"\x01\xbb" + b"x")
    assert d.host == "::1" and d.port == 443 and bytes(d.data) == b"x"
    assert encode_udp_header("::1", 443) == b"\x00\x00\x00\x04" + bytes(15) + b"\x01\x01\xbb"
    d = parse_udp_datagram(b"\x00\x00\x02\x03\x0bexample.com\x00\x50")
    assert d.frag == 2 and d.host == "example.com" and d.port == 80 and bytes(d.data) == b""


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x00\x00", "udp_truncated"),
        (b"\x00\x01\x00\x01\x7f\x00\x00\x01\x00\x35", "udp_bad_rsv"),
        (b"\x00\x00\x00\x02\x7f\x00\x00\x01\x00\x35", "udp_bad_address_type"),
        (b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00", "udp_truncated"),
        (b"\x00\x00\x00\x03\x05ab", "udp_truncated"),
        (b"\x00\x00\x00\x03\x03a b\x00\x35", "udp_bad_domain_name"),
    ],
)
def test_udp_malformed(data, reason):
    with pytest.raises(ProtocolError) as err:
        parse_udp_datagram(data)
    assert err.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_udp_any_bytes_parse_or_protocol_error(data):
    try:
        parse_udp_datagram(data)
    except ProtocolError:
        pass


@pytest.mark.parametrize("module", ["socks4", "socks5_udp"])
def test_codecs_import_nothing_that_does_io(module):
    import ast
    import importlib
    from pathlib import Path

    path = Path(importlib.import_module(f"socksd.{module}").__file__)
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "dataclasses", "typing", "socksd"}
