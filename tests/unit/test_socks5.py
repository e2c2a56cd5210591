"""Unit tests of the sans-IO SOCKS5 server codec (RFC 1928, RFC 1929).

Vectors are fed whole, one byte at a time and with trailing bytes. No sockets.
"""

import ast
import dataclasses
import ipaddress
import itertools
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import socksd.socks5 as socks5_module
from socksd.socks5 import (
    NEED_DATA,
    AddressType,
    AuthStatus,
    Command,
    CommandReply,
    CommandRequest,
    ConnectionClosed,
    Greeting,
    LocalProtocolError,
    Method,
    MethodSelection,
    ProtocolError,
    Reply,
    ServerMessage,
    Socks5ServerConnection,
    State,
    UserPassAuth,
    choose_method,
)

# --- vectors -----------------------------------------------------------------

GREETING_NOAUTH = b"\x05\x01\x00"
GREETING_BOTH = b"\x05\x02\x00\x02"
GREETING_USERPASS = b"\x05\x01\x02"
AUTH = b"\x01\x04user\x06secret"
REQ_V4 = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"
REQ_V6 = b"\x05\x01\x00\x04" + ipaddress.IPv6Address("2001:db8::1").packed + b"\x01\xbb"
REQ_DOMAIN = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
PAYLOAD = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"


def failure(code: int) -> bytes:
    """RFC 1928 §6 reply with REP=code and BND 0.0.0.0:0."""
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


def request(command: int, atyp: int, addr: bytes, port: int, rsv: int = 0) -> bytes:
    return bytes([5, command, rsv, atyp]) + addr + port.to_bytes(2, "big")


def domain(name: bytes) -> bytes:
    return bytes([len(name)]) + name


AUTH_FAILED = b"\x01\x01"
GENERAL_FAILURE = failure(1)

# --- helpers -----------------------------------------------------------------

Feeder = Callable[[Socks5ServerConnection, bytes], object]
Factory = Callable[..., Socks5ServerConnection]


def feed_whole(conn: Socks5ServerConnection, data: bytes) -> object:
    conn.receive_data(data)
    return conn.next_event()


def feed_bytewise(conn: Socks5ServerConnection, data: bytes) -> object:
    """Feed one byte at a time; NEED_DATA must come before the last byte."""
    for i, byte in enumerate(data):
        conn.receive_data(bytes([byte]))
        event = conn.next_event()
        if i < len(data) - 1:
            assert event is NEED_DATA, f"event after byte {i} of {len(data)}"
    return event


FEEDERS = pytest.mark.parametrize("feed", [feed_whole, feed_bytewise], ids=["whole", "bytewise"])


def at_greeting(max_buffer: int = 65536) -> Socks5ServerConnection:
    return Socks5ServerConnection(max_buffer)


def at_auth(max_buffer: int = 65536) -> Socks5ServerConnection:
    conn = Socks5ServerConnection(max_buffer)
    conn.receive_data(GREETING_USERPASS)
    assert conn.next_event() == Greeting((2,))
    assert conn.send(MethodSelection(Method.USERNAME_PASSWORD)) == b"\x05\x02"
    assert conn.state is State.AUTH
    return conn


def at_request(max_buffer: int = 65536) -> Socks5ServerConnection:
    conn = Socks5ServerConnection(max_buffer)
    conn.receive_data(GREETING_NOAUTH)
    assert conn.next_event() == Greeting((0,))
    assert conn.send(MethodSelection(Method.NO_AUTH)) == b"\x05\x00"
    assert conn.state is State.REQUEST
    return conn


def at_reply(max_buffer: int = 65536) -> Socks5ServerConnection:
    conn = at_request(max_buffer)
    conn.receive_data(REQ_V4)
    assert isinstance(conn.next_event(), CommandRequest)
    assert conn.state is State.SEND_REPLY
    return conn


def at_relaying(max_buffer: int = 65536) -> Socks5ServerConnection:
    conn = at_reply(max_buffer)
    conn.send(CommandReply(Reply.SUCCEEDED))
    assert conn.state is State.RELAYING
    return conn


def at_closed(max_buffer: int = 65536) -> Socks5ServerConnection:
    conn = Socks5ServerConnection(max_buffer)
    conn.receive_data(b"\x05\x01\x80")
    conn.next_event()
    assert conn.send(MethodSelection(Method.NO_ACCEPTABLE)) == b"\x05\xff"
    assert conn.state is State.CLOSED
    return conn


def at_error(max_buffer: int = 65536) -> Socks5ServerConnection:
    conn = Socks5ServerConnection(max_buffer)
    conn.receive_data(b"\x04")
    with pytest.raises(ProtocolError):
        conn.next_event()
    assert conn.state is State.ERROR
    return conn


# --- greeting (RFC 1928 §3) ----------------------------------------------------


@FEEDERS
@pytest.mark.parametrize(
    ("wire", "methods"),
    [
        (GREETING_NOAUTH, (0,)),
        (GREETING_BOTH, (0, 2)),
        (b"\x05\x00", ()),
        (b"\x05\x03\x80\x02\x01", (0x80, 2, 1)),
        (b"\x05\xff" + bytes(range(255)), tuple(range(255))),
    ],
)
def test_greeting(feed: Feeder, wire: bytes, methods: tuple[int, ...]) -> None:
    conn = Socks5ServerConnection()
    assert feed(conn, wire) == Greeting(methods)
    assert conn.state is State.SEND_METHOD
    assert conn.trailing_data == b""


def test_greeting_with_trailing_bytes_waits_for_method_selection() -> None:
    conn = Socks5ServerConnection()
    conn.receive_data(GREETING_NOAUTH + REQ_V4)
    assert conn.next_event() == Greeting((0,))
    # Not parsed until the server answers, but kept.
    assert conn.next_event() is NEED_DATA
    assert conn.next_event() is NEED_DATA
    assert conn.trailing_data == REQ_V4
    conn.send(MethodSelection(Method.NO_AUTH))
    assert conn.next_event() == CommandRequest(Command.CONNECT, AddressType.IPV4, "127.0.0.1", 80)


def test_empty_input_needs_data() -> None:
    conn = Socks5ServerConnection()
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"\x05")
    assert conn.next_event() is NEED_DATA
    assert conn.state is State.GREETING


@pytest.mark.parametrize(
    ("method", "wire", "state"),
    [
        (Method.NO_AUTH, b"\x05\x00", State.REQUEST),
        (Method.USERNAME_PASSWORD, b"\x05\x02", State.AUTH),
        (Method.NO_ACCEPTABLE, b"\x05\xff", State.CLOSED),
    ],
)
def test_method_selection(method: Method, wire: bytes, state: State) -> None:
    conn = Socks5ServerConnection()
    conn.receive_data(GREETING_BOTH)
    conn.next_event()
    assert conn.send(MethodSelection(method)) == wire
    assert conn.state is state


def test_no_acceptable_allowed_for_empty_greeting() -> None:
    conn = Socks5ServerConnection()
    conn.receive_data(b"\x05\x00")
    assert conn.next_event() == Greeting(())
    assert conn.send(MethodSelection(0xFF)) == b"\x05\xff"


# --- username/password (RFC 1929) ----------------------------------------------


@FEEDERS
@pytest.mark.parametrize(
    ("wire", "username", "password"),
    [
        (AUTH, b"user", b"secret"),
        (b"\x01\x00\x00", b"", b""),
        (b"\x01\x00\x01p", b"", b"p"),
        (b"\x01\x01u\x00", b"u", b""),
        (b"\x01\xff" + b"u" * 255 + b"\xff" + b"\x00" * 255, b"u" * 255, b"\x00" * 255),
    ],
)
def test_auth(feed: Feeder, wire: bytes, username: bytes, password: bytes) -> None:
    conn = at_auth()
    assert feed(conn, wire) == UserPassAuth(username, password)
    assert conn.state is State.SEND_AUTH_STATUS


def test_auth_with_trailing_bytes() -> None:
    conn = at_auth()
    conn.receive_data(AUTH + REQ_DOMAIN[:5])
    assert conn.next_event() == UserPassAuth(b"user", b"secret")
    assert conn.next_event() is NEED_DATA
    assert conn.trailing_data == REQ_DOMAIN[:5]


@pytest.mark.parametrize(
    ("ok", "wire", "state"),
    [(True, b"\x01\x00", State.REQUEST), (False, b"\x01\x01", State.CLOSED)],
)
def test_auth_status(ok: bool, wire: bytes, state: State) -> None:
    conn = at_auth()
    conn.receive_data(AUTH)
    conn.next_event()
    assert conn.send(AuthStatus(ok)) == wire
    assert conn.state is state


# --- requests (RFC 1928 §4, §5) ---------------------------------------------------

ADDRESSES = [
    (AddressType.IPV4, b"\x7f\x00\x00\x01", "127.0.0.1"),
    (AddressType.IPV4, b"\x00\x00\x00\x00", "0.0.0.0"),
    (AddressType.IPV6, ipaddress.IPv6Address("2001:db8::1").packed, "2001:db8::1"),
    (AddressType.IPV6, bytes(15) + b"\x01", "::1"),
    (AddressType.IPV6, ipaddress.IPv6Address("::ffff:1.2.3.4").packed, "::ffff:102:304"),
    (AddressType.DOMAINNAME, domain(b"example.com"), "example.com"),
    (AddressType.DOMAINNAME, domain(b"a"), "a"),
    (AddressType.DOMAINNAME, domain(b"x" * 255), "x" * 255),
    (AddressType.DOMAINNAME, domain(b"10.0.0.1"), "10.0.0.1"),
]


@FEEDERS
@pytest.mark.parametrize("command", list(Command))
@pytest.mark.parametrize(("atyp", "addr", "host"), ADDRESSES)
def test_request(feed: Feeder, command: Command, atyp: AddressType, addr: bytes, host: str) -> None:
    conn = at_request()
    event = feed(conn, request(command, atyp, addr, 0xABCD))
    assert event == CommandRequest(command, atyp, host, 0xABCD)
    assert isinstance(event, CommandRequest)
    assert type(event.command) is Command
    assert type(event.address_type) is AddressType
    assert conn.state is State.SEND_REPLY
    assert conn.trailing_data == b""


@pytest.mark.parametrize("port", [0, 1, 80, 65535])
def test_request_port(port: int) -> None:
    conn = at_request()
    conn.receive_data(request(Command.CONNECT, AddressType.IPV4, b"\x01\x02\x03\x04", port))
    assert conn.next_event() == CommandRequest(Command.CONNECT, AddressType.IPV4, "1.2.3.4", port)


def test_request_rsv_is_ignored() -> None:
    conn = at_request()
    conn.receive_data(request(Command.CONNECT, AddressType.IPV4, b"\x01\x02\x03\x04", 1, rsv=0xAA))
    assert conn.next_event() == CommandRequest(Command.CONNECT, AddressType.IPV4, "1.2.3.4", 1)


@pytest.mark.parametrize("wire", [REQ_V4, REQ_V6, REQ_DOMAIN])
@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_request_with_trailing_payload(wire: bytes, split: str) -> None:
    conn = at_request()
    data = wire + PAYLOAD
    chunks = [data] if split == "whole" else [bytes([b]) for b in data]
    events = []
    for chunk in chunks:
        conn.receive_data(chunk)
        if conn.state is State.REQUEST:
            events.append(conn.next_event())
    assert [e for e in events if e is not NEED_DATA] == [
        CommandRequest(Command.CONNECT, AddressType(wire[3]), *_host_port(wire))
    ]
    assert conn.trailing_data == PAYLOAD
    assert conn.next_event() is NEED_DATA  # SEND_REPLY: waiting for us.
    conn.send(CommandReply(Reply.SUCCEEDED, "192.0.2.1", 4242))
    assert conn.state is State.RELAYING
    assert conn.trailing_data == PAYLOAD


def _host_port(wire: bytes) -> tuple[str, int]:
    conn = at_request()
    conn.receive_data(wire)
    event = conn.next_event()
    assert isinstance(event, CommandRequest)
    return event.host, event.port


def test_data_fed_while_relaying_is_appended_to_trailing_data() -> None:
    conn = at_reply()
    conn.receive_data(b"abc")
    conn.send(CommandReply(Reply.SUCCEEDED))
    conn.receive_data(b"def")
    assert conn.trailing_data == b"abcdef"
    assert conn.trailing_data == b"abcdef"  # Reading does not consume.


# --- pipelining ----------------------------------------------------------------


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_pipelined_handshake_in_one_segment(split: str) -> None:
    data = GREETING_USERPASS + AUTH + REQ_DOMAIN + PAYLOAD
    conn = Socks5ServerConnection()
    chunks = [data] if split == "whole" else [bytes([b]) for b in data]
    events: list[object] = []
    wire = b""
    answers: dict[State, ServerMessage] = {
        State.SEND_METHOD: MethodSelection(Method.USERNAME_PASSWORD),
        State.SEND_AUTH_STATUS: AuthStatus(True),
        State.SEND_REPLY: CommandReply(Reply.SUCCEEDED, "10.0.0.1", 1080),
    }
    for chunk in chunks:
        conn.receive_data(chunk)
        while conn.state is not State.RELAYING:
            event = conn.next_event()
            if event is NEED_DATA:
                if conn.state not in answers:
                    break
                wire += conn.send(answers[conn.state])
            else:
                events.append(event)
    assert events == [
        Greeting((2,)),
        UserPassAuth(b"user", b"secret"),
        CommandRequest(Command.CONNECT, AddressType.DOMAINNAME, "example.com", 443),
    ]
    assert wire == b"\x05\x02" + b"\x01\x00" + b"\x05\x00\x00\x01\x0a\x00\x00\x01\x04\x38"
    assert conn.trailing_data == PAYLOAD


def test_pipelined_without_auth_in_one_segment() -> None:
    conn = Socks5ServerConnection()
    conn.receive_data(GREETING_NOAUTH + REQ_V6 + PAYLOAD)
    assert conn.next_event() == Greeting((0,))
    conn.send(MethodSelection(Method.NO_AUTH))
    assert conn.next_event() == CommandRequest(
        Command.CONNECT, AddressType.IPV6, "2001:db8::1", 443
    )
    assert conn.trailing_data == PAYLOAD


# --- protocol errors ------------------------------------------------------------


def _error_at(state_factory: Factory, wire: bytes) -> ProtocolError:
    conn = state_factory()
    conn.receive_data(wire)
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    assert conn.state is State.ERROR
    return info.value


@pytest.mark.parametrize(
    ("factory", "wire", "reason", "reply"),
    [
        (Socks5ServerConnection, b"\x04\x01\x00", "bad_version", b""),
        (Socks5ServerConnection, b"\x04", "bad_version", b""),
        (Socks5ServerConnection, b"GET / HTTP/1.1\r\n", "bad_version", b""),
        (Socks5ServerConnection, b"\x00", "bad_version", b""),
        (at_auth, b"\x05\x04user\x06secret", "bad_auth_version", AUTH_FAILED),
        (at_auth, b"\x00", "bad_auth_version", AUTH_FAILED),
        (at_request, b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", "bad_version", GENERAL_FAILURE),
        (at_request, b"\x01", "bad_version", GENERAL_FAILURE),
        (at_request, b"\x05\x00", "unknown_command", failure(7)),
        (at_request, b"\x05\x04\x00\x01", "unknown_command", failure(7)),
        (at_request, b"\x05\xff\x00\x01\x7f\x00\x00\x01\x00\x50", "unknown_command", failure(7)),
        (at_request, b"\x05\x01\x00\x00", "unknown_address_type", failure(8)),
        (at_request, b"\x05\x01\x00\x02", "unknown_address_type", failure(8)),
        (at_request, b"\x05\x03\x00\x05\x00\x00", "unknown_address_type", failure(8)),
        (at_request, b"\x05\x01\x00\xff", "unknown_address_type", failure(8)),
        (at_request, b"\x05\x01\x00\x03\x00\x00\x50", "bad_domain_name", failure(4)),
        (at_request, b"\x05\x01\x00\x03\x00", "bad_domain_name", failure(4)),
        (at_request, b"\x05\x01\x00\x03\x04caf\xe9\x00\x50", "bad_domain_name", failure(4)),
        (at_request, b"\x05\x01\x00\x03\x03a\x00b\x00\x50", "bad_domain_name", failure(4)),
        (at_request, b"\x05\x01\x00\x03\x03a b\x00\x50", "bad_domain_name", failure(4)),
        (at_request, b"\x05\x01\x00\x03\x02a\n\x00\x50", "bad_domain_name", failure(4)),
        (at_request, b"\x05\x01\x00\x03\x02a\x7f\x00\x50", "bad_domain_name", failure(4)),
    ],
)
def test_protocol_error(factory: Factory, wire: bytes, reason: str, reply: bytes) -> None:
    error = _error_at(factory, wire)
    assert error.reason == reason
    assert error.reply == reply
    assert str(error) == reason


def test_errors_are_raised_as_soon_as_the_bad_byte_arrives() -> None:
    # Bytewise and whole feeding fail identically (a complete message is not needed).
    assert _error_at(at_request, b"\x05\x09").reason == "unknown_command"
    assert _error_at(at_request, b"\x05\x01\x00\x07").reason == "unknown_address_type"
    # Domain checked when the name is complete, before DST.PORT.
    assert _error_at(at_request, b"\x05\x01\x00\x03\x01\x00").reason == "bad_domain_name"


def test_error_precedence_follows_field_order() -> None:
    assert _error_at(at_request, b"\x04\x09\x00\x09").reason == "bad_version"
    assert _error_at(at_request, b"\x05\x09\x00\x09").reason == "unknown_command"


def test_error_state_is_sticky() -> None:
    conn = at_error()
    for call in (
        conn.next_event,
        lambda: conn.receive_data(b"\x05"),
        lambda: conn.receive_data(b""),
    ):
        with pytest.raises(ProtocolError) as info:
            call()
        assert info.value.reason == "bad_version"
        assert info.value.reply == b""
    assert conn.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        conn.send(MethodSelection(Method.NO_AUTH))


def test_protocol_error_repr() -> None:
    error = ProtocolError("bad_version", b"\x01")
    assert repr(error) == "ProtocolError(reason='bad_version', reply=b'\\x01')"
    assert ProtocolError("x").reply == b""


# --- EOF -------------------------------------------------------------------------


def test_eof_on_fresh_connection() -> None:
    conn = Socks5ServerConnection()
    conn.receive_data(b"")
    assert conn.eof_received
    assert conn.next_event() == ConnectionClosed()
    assert conn.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.next_event()


@pytest.mark.parametrize(
    ("factory", "partial"),
    [
        (Socks5ServerConnection, b"\x05"),
        (Socks5ServerConnection, b"\x05\x02\x00"),
        (at_auth, b"\x01\x04us"),
        (at_request, b"\x05\x01\x00\x01\x7f"),
        (at_request, REQ_DOMAIN[:-1]),
    ],
)
def test_eof_drops_partial_message(factory: Factory, partial: bytes) -> None:
    conn = factory()
    conn.receive_data(partial)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert conn.state is State.CLOSED
    assert conn.trailing_data == b""


def test_eof_after_complete_message_yields_it_first() -> None:
    conn = Socks5ServerConnection()
    conn.receive_data(GREETING_NOAUTH)
    conn.receive_data(b"")
    assert conn.next_event() == Greeting((0,))
    assert conn.next_event() is NEED_DATA  # SEND_METHOD: our turn, even after EOF.
    conn.send(MethodSelection(Method.NO_AUTH))
    assert conn.next_event() == ConnectionClosed()


def test_eof_after_pipelined_handshake_reaches_relaying() -> None:
    conn = Socks5ServerConnection()
    conn.receive_data(GREETING_NOAUTH + REQ_V4 + PAYLOAD)
    conn.receive_data(b"")
    assert conn.next_event() == Greeting((0,))
    conn.send(MethodSelection(Method.NO_AUTH))
    assert isinstance(conn.next_event(), CommandRequest)
    conn.send(CommandReply(Reply.SUCCEEDED))
    assert conn.state is State.RELAYING
    assert conn.eof_received
    assert conn.trailing_data == PAYLOAD


@pytest.mark.parametrize("factory", [Socks5ServerConnection, at_auth, at_request, at_relaying])
def test_data_after_eof_is_a_local_error(factory: Factory) -> None:
    conn = factory()
    conn.receive_data(b"")
    conn.receive_data(b"")  # Repeated EOF is harmless.
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")


def test_eof_while_relaying_keeps_trailing_data() -> None:
    conn = at_reply()
    conn.receive_data(b"payload")
    conn.send(CommandReply(Reply.SUCCEEDED))
    conn.receive_data(b"")
    assert conn.trailing_data == b"payload"
    assert conn.state is State.RELAYING


# --- buffer bound --------------------------------------------------------------


def test_buffer_limit_is_inclusive() -> None:
    conn = Socks5ServerConnection(max_buffer=8)
    conn.receive_data(b"\x05\x07" + b"\x00" * 6)
    assert conn.next_event() is NEED_DATA
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(b"\x00")
    assert info.value.reason == "buffer_overflow"
    assert conn.state is State.ERROR


def test_buffer_limit_counts_only_unconsumed_input() -> None:
    conn = Socks5ServerConnection(max_buffer=10)
    conn.receive_data(GREETING_NOAUTH)
    conn.next_event()
    conn.send(MethodSelection(Method.NO_AUTH))
    conn.receive_data(REQ_V4)  # 10 bytes: exactly the limit after the greeting left.
    assert isinstance(conn.next_event(), CommandRequest)


@pytest.mark.parametrize(
    ("factory", "reply"),
    [
        (at_greeting, b"\x05\xff"),
        (at_auth, AUTH_FAILED),
        (at_request, GENERAL_FAILURE),
        (at_reply, GENERAL_FAILURE),
        (at_relaying, b""),
    ],
)
def test_buffer_overflow_reply_per_state(factory: Factory, reply: bytes) -> None:
    conn = factory(max_buffer=16)
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(b"\x05" * 17)
    assert (info.value.reason, info.value.reply) == ("buffer_overflow", reply)
    assert conn.state is State.ERROR
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_buffer_overflow_while_awaiting_our_answer() -> None:
    conn = Socks5ServerConnection(max_buffer=8)
    conn.receive_data(GREETING_BOTH + b"\x01" * 4)
    assert conn.next_event() == Greeting((0, 2))
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(b"\x01" * 5)
    assert (info.value.reason, info.value.reply) == ("buffer_overflow", b"\x05\xff")
    assert conn.state is State.ERROR

    conn = at_auth(max_buffer=len(AUTH))
    conn.receive_data(AUTH)
    assert conn.next_event() == UserPassAuth(b"user", b"secret")
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(b"\x05" * (len(AUTH) + 1))
    assert info.value.reply == AUTH_FAILED


def test_buffer_overflow_from_non_socks_client_has_no_reply() -> None:
    conn = Socks5ServerConnection(max_buffer=4)
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(b"GET / HTTP/1.1\r\n")
    assert (info.value.reason, info.value.reply) == ("buffer_overflow", b"")


def test_data_after_refusal_is_discarded() -> None:
    conn = at_closed()
    conn.receive_data(b"x" * 100_000)
    assert conn.state is State.CLOSED
    assert conn.trailing_data == b""


@pytest.mark.parametrize("size", [0, -1])
def test_max_buffer_must_be_positive(size: int) -> None:
    with pytest.raises(ValueError, match="max_buffer"):
        Socks5ServerConnection(max_buffer=size)


# --- sends: encodings and illegal sends -------------------------------------------


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (CommandReply(Reply.SUCCEEDED), b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"),
        (
            CommandReply(Reply.SUCCEEDED, "192.0.2.7", 1080),
            b"\x05\x00\x00\x01\xc0\x00\x02\x07\x04\x38",
        ),
        (
            CommandReply(Reply.SUCCEEDED, "2001:db8::2", 65535),
            b"\x05\x00\x00\x04" + ipaddress.IPv6Address("2001:db8::2").packed + b"\xff\xff",
        ),
        (
            CommandReply(Reply.SUCCEEDED, "::ffff:192.0.2.7", 1),
            b"\x05\x00\x00\x04" + ipaddress.IPv6Address("::ffff:192.0.2.7").packed + b"\x00\x01",
        ),
        (
            CommandReply(Reply.SUCCEEDED, "proxy.example", 80),
            b"\x05\x00\x00\x03\x0dproxy.example\x00\x50",
        ),
    ],
)
def test_success_reply_encoding(message: CommandReply, wire: bytes) -> None:
    conn = at_reply()
    assert conn.send(message) == wire
    assert conn.state is State.RELAYING


@pytest.mark.parametrize("reply", [r for r in Reply if r is not Reply.SUCCEEDED])
def test_failure_reply_encoding_closes(reply: Reply) -> None:
    conn = at_reply()
    assert conn.send(CommandReply(reply)) == failure(reply)
    assert conn.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.next_event()


def test_reply_accepts_plain_int_code() -> None:
    conn = at_reply()
    assert conn.send(CommandReply(5)) == failure(5)  # type: ignore[arg-type]


FACTORIES = {
    "GREETING": at_greeting,
    "AUTH": at_auth,
    "REQUEST": at_request,
    "SEND_REPLY": at_reply,
    "RELAYING": at_relaying,
    "CLOSED": at_closed,
    "ERROR": at_error,
}
MESSAGES = [
    MethodSelection(Method.NO_AUTH),
    AuthStatus(True),
    CommandReply(Reply.SUCCEEDED),
]
WRONG_STATE_SENDS = [
    pytest.param(name, message, id=f"{type(message).__name__}-in-{name}")
    for name in FACTORIES
    for message in MESSAGES
    if (name, type(message)) != ("SEND_REPLY", CommandReply)
]


@pytest.mark.parametrize(("state_name", "message"), WRONG_STATE_SENDS)
def test_send_in_wrong_state(state_name: str, message: ServerMessage) -> None:
    conn = FACTORIES[state_name]()
    before = conn.state
    with pytest.raises(LocalProtocolError):
        conn.send(message)
    assert conn.state is before


def test_send_in_send_states_requires_matching_message() -> None:
    conn = Socks5ServerConnection()
    conn.receive_data(GREETING_BOTH)
    conn.next_event()
    for message in (AuthStatus(True), CommandReply(Reply.SUCCEEDED)):
        with pytest.raises(LocalProtocolError):
            conn.send(message)
    conn.send(MethodSelection(Method.USERNAME_PASSWORD))
    conn.receive_data(AUTH)
    conn.next_event()
    for message2 in (MethodSelection(Method.NO_AUTH), CommandReply(Reply.SUCCEEDED)):
        with pytest.raises(LocalProtocolError):
            conn.send(message2)
    assert conn.state is State.SEND_AUTH_STATUS


@pytest.mark.parametrize(
    ("greeting", "method"),
    [
        (b"\x05\x01\x01", Method.GSSAPI),  # Offered, but no GSSAPI sub-negotiation here.
        (b"\x05\x01\x80", 0x80),  # Private method we cannot run.
        (b"\x05\x01\x00", Method.USERNAME_PASSWORD),  # Not offered.
        (b"\x05\x01\x02", Method.NO_AUTH),  # Not offered.
        (b"\x05\x00", Method.NO_AUTH),  # Nothing offered.
        (b"\x05\x01\x00", 0x100),
        (b"\x05\x01\x00", -1),
    ],
)
def test_illegal_method_selection(greeting: bytes, method: int) -> None:
    conn = Socks5ServerConnection()
    conn.receive_data(greeting)
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send(MethodSelection(method))
    assert conn.state is State.SEND_METHOD


@pytest.mark.parametrize(
    "message",
    [
        CommandReply(0x09),  # type: ignore[arg-type]  # Unassigned REP.
        CommandReply(Reply.SUCCEEDED, port=-1),
        CommandReply(Reply.SUCCEEDED, port=65536),
        CommandReply(Reply.SUCCEEDED, port="80"),  # type: ignore[arg-type]
        CommandReply(Reply.SUCCEEDED, address=""),
        CommandReply(Reply.SUCCEEDED, address="x" * 256),
        CommandReply(Reply.SUCCEEDED, address="café.example"),
        CommandReply(Reply.SUCCEEDED, address="a b"),
        CommandReply(Reply.SUCCEEDED, address=b"\x7f\x00\x00\x01"),  # type: ignore[arg-type]
        CommandReply(Reply.SUCCEEDED, address=2130706433),  # type: ignore[arg-type]
    ],
)
def test_illegal_command_reply(message: CommandReply) -> None:
    conn = at_reply()
    with pytest.raises(LocalProtocolError):
        conn.send(message)
    assert conn.state is State.SEND_REPLY


def test_send_unknown_message_type() -> None:
    conn = at_reply()
    with pytest.raises(LocalProtocolError):
        conn.send(b"\x05\x00")  # type: ignore[arg-type]


@pytest.mark.parametrize("factory", [at_relaying, at_closed])
def test_next_event_after_handshake_is_a_local_error(
    factory: Factory,
) -> None:
    with pytest.raises(LocalProtocolError):
        factory().next_event()


def test_values_are_slotted() -> None:
    for value in (
        Greeting(()),
        UserPassAuth(b"", b""),
        CommandRequest(Command.CONNECT, AddressType.IPV4, "1.2.3.4", 1),
        ConnectionClosed(),
        MethodSelection(0),
        AuthStatus(True),
        CommandReply(Reply.SUCCEEDED),
    ):
        assert not hasattr(value, "__dict__")
        # Only declared fields exist (read-only by convention, not frozen: see the
        # codec's note on the cost of frozen dataclasses).
        with pytest.raises(AttributeError):
            value.undeclared = 1  # type: ignore[attr-defined]


def test_state_is_read_only() -> None:
    conn = Socks5ServerConnection()
    with pytest.raises(AttributeError):
        conn.state = State.RELAYING  # type: ignore[misc]


def test_need_data_is_a_unique_sentinel() -> None:
    assert NEED_DATA is socks5_module.NEED_DATA
    assert list(socks5_module.NeedData) == [NEED_DATA]
    assert not isinstance(NEED_DATA, (Greeting, UserPassAuth, CommandRequest, ConnectionClosed))
    assert repr(NEED_DATA) == "NEED_DATA"


def test_wire_constants() -> None:
    assert [int(m) for m in Method] == [0x00, 0x01, 0x02, 0xFF]
    assert [int(c) for c in Command] == [1, 2, 3]
    assert [int(a) for a in AddressType] == [1, 3, 4]
    assert [int(r) for r in Reply] == list(range(9))


# --- choose_method ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "acceptable", "expected"),
    [
        ((0, 2), (2, 0), 2),
        ((0, 2), (0, 2), 0),
        ((2, 0), (0,), 0),
        ((0,), (2,), Method.NO_ACCEPTABLE),
        ((), (0, 2), Method.NO_ACCEPTABLE),
        ((0, 2), (), Method.NO_ACCEPTABLE),
        ((0x80, 1, 2), (0, 1, 2), 1),
        ([2, 2, 0], [2], 2),
    ],
)
def test_choose_method(offered: Iterable[int], acceptable: Iterable[int], expected: int) -> None:
    assert choose_method(tuple(offered), tuple(acceptable)) == expected


def test_choose_method_result_feeds_method_selection() -> None:
    conn = Socks5ServerConnection()
    conn.receive_data(GREETING_BOTH)
    greeting = conn.next_event()
    assert isinstance(greeting, Greeting)
    method = choose_method(greeting.methods, [Method.USERNAME_PASSWORD, Method.NO_AUTH])
    assert conn.send(MethodSelection(method)) == b"\x05\x02"


# --- house rules ------------------------------------------------------------------


def test_codec_imports_nothing_that_does_io() -> None:
    tree = ast.parse(Path(socks5_module.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            # socksd.codec, the shared vocabulary, by name only: test_codec.py checks it.
            imported.add(module if module == "socksd.codec" else module.split(".")[0])
    allowed = {"ipaddress", "collections", "dataclasses", "enum", "typing", "socksd.codec"}
    assert imported <= allowed


# --- property: any input, any chunking -------------------------------------------

# The fixed server policy: NO_AUTH, else USERNAME_PASSWORD (so RFC 1929 is
# exercised too), else X'FF'; accept every credential; succeed every request.
ACCEPTABLE = (Method.NO_AUTH, Method.USERNAME_PASSWORD)
POLICY: dict[State, ServerMessage] = {
    State.SEND_AUTH_STATUS: AuthStatus(True),
    State.SEND_REPLY: CommandReply(Reply.SUCCEEDED),
}


def drive(chunks: Iterable[bytes], eof: bool) -> list[object]:
    """Feed chunks with a fixed server policy; return everything observable.

    Only ProtocolError is caught, so any other exception fails the test.
    """
    conn = Socks5ServerConnection()
    log: list[object] = []
    offered: tuple[int, ...] = ()
    # b"" is EOF to the codec, so empty chunks are dropped; EOF comes last.
    for chunk in [*(c for c in chunks if c), *([b""] if eof else [])]:
        try:
            conn.receive_data(chunk)
        except ProtocolError as exc:
            log.append(("error", exc.reason, exc.reply))
            return log
        while conn.state not in (State.RELAYING, State.CLOSED):
            if conn.state is State.SEND_METHOD:
                method = choose_method(offered, ACCEPTABLE)
                log.append(("sent", conn.send(MethodSelection(method))))
                continue
            if conn.state in POLICY:
                log.append(("sent", conn.send(POLICY[conn.state])))
                continue
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                log.append(("error", exc.reason, exc.reply))
                return log
            if event is NEED_DATA:
                break
            assert isinstance(event, (Greeting, UserPassAuth, CommandRequest, ConnectionClosed))
            if isinstance(event, Greeting):
                offered = event.methods
            log.append(event)
    log.append(("end", conn.state, conn.trailing_data if conn.state is State.RELAYING else None))
    return log


@st.composite
def socks_streams(draw: st.DrawFn) -> bytes:
    """Mostly-valid client streams, then mutated, so deep states get reached."""
    methods = draw(st.lists(st.sampled_from([0, 0, 2, 2, 1, 0x80, 0xFF]), max_size=4))
    parts = [bytes([5, len(methods), *methods])]
    if 2 in methods and 0 not in methods:
        user, password = draw(st.binary(max_size=8)), draw(st.binary(max_size=8))
        parts.append(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
    addr = draw(
        st.one_of(
            st.binary(min_size=4, max_size=4).map(lambda b: b"\x01" + b),
            st.binary(min_size=16, max_size=16).map(lambda b: b"\x04" + b),
            st.binary(max_size=12).map(lambda b: b"\x03" + bytes([len(b)]) + b),
            st.text("abc.-", min_size=1, max_size=12).map(
                lambda t: b"\x03" + bytes([len(t)]) + t.encode()
            ),
            st.binary(max_size=6).map(lambda b: b"\x02" + b),  # Unknown ATYP.
        )
    )
    command = draw(st.sampled_from([1, 2, 3, 0, 4]))
    port = draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
    parts.append(bytes([5, command, draw(st.integers(0, 255))]) + addr + port)
    parts.append(draw(st.binary(max_size=16)))
    data = bytearray(b"".join(parts))
    for _ in range(draw(st.integers(0, 2))):
        if data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)


@st.composite
def chunkings(draw: st.DrawFn) -> list[bytes]:
    data = draw(st.one_of(socks_streams(), socks_streams(), st.binary(max_size=64)))
    cuts = sorted(draw(st.sets(st.integers(0, len(data)), max_size=8)))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


@settings(max_examples=300, deadline=None, database=None)
@given(chunks=chunkings(), eof=st.booleans())
def test_any_input_in_any_chunking_gives_the_same_events(chunks: list[bytes], eof: bool) -> None:
    data = b"".join(chunks)
    whole = drive([data], eof)
    assert drive(chunks, eof) == whole
    assert drive([bytes([b]) for b in data], eof) == whole


@pytest.mark.parametrize(
    ("text", "packed"),
    [
        ("10.0.0.1", b"\x0a\x00\x00\x01"),
        ("255.255.255.255", b"\xff\xff\xff\xff"),
        ("0.0.0.0", b"\x00\x00\x00\x00"),
        ("256.0.0.1", None),
        ("01.2.3.4", None),
        ("1.2.3", None),
        ("1..2.3", None),
        ("+1.2.3.4", None),
        ("\u0661.2.3.4", None),
    ],
)
def test_ipv4_fast_path_accepts_only_canonical_dotted_quads(text, packed):
    from socksd.socks5 import _ipv4_packed

    assert _ipv4_packed(text) == packed


# --- property: every reading state, every server answer ------------------------------
#
# The property above keeps one server policy and mostly starts from GREETING. These add
# what it leaves out: the server choosing USERNAME_PASSWORD although NO_AUTH is offered,
# refusing the method, the credentials or the request; arbitrary bytes from each reading
# state; 255-byte fields; insertions and deletions, not only replaced bytes; small
# buffer limits. Every event is checked against what RFC 1928/1929 can encode, and the
# consumed bytes are re-encoded by an encoder written here, so no byte is lost, added or
# reordered between the events and `trailing_data`.


@dataclasses.dataclass(frozen=True, slots=True)
class ServerPolicy:
    acceptable: tuple[int, ...]  # most preferred first; () answers X'FF'
    auth_ok: bool
    reply: Reply


def policies(acceptable: st.SearchStrategy[tuple[int, ...]]) -> st.SearchStrategy[ServerPolicy]:
    return st.builds(
        ServerPolicy,
        acceptable=acceptable,
        # Mostly yes, so the later states are reached often.
        auth_ok=st.sampled_from([True, True, True, False]),
        reply=st.one_of(st.just(Reply.SUCCEEDED), st.sampled_from(list(Reply))),
    )


ANY_ACCEPTABLE = st.sampled_from([(0, 2), (2, 0), (0, 2), (2, 0), (2,), (0,), ()])

# The only ProtocolErrors there are, and the reply each may carry (RFC 1928 §3/§6,
# RFC 1929 §2).
ERROR_REPLIES: dict[str, set[bytes]] = {
    "bad_version": {b"", GENERAL_FAILURE},
    "bad_auth_version": {AUTH_FAILED},
    "unknown_command": {failure(Reply.COMMAND_NOT_SUPPORTED)},
    "unknown_address_type": {failure(Reply.ADDRESS_TYPE_NOT_SUPPORTED)},
    "bad_domain_name": {failure(Reply.HOST_UNREACHABLE)},
    "buffer_overflow": {b"", b"\x05\xff", AUTH_FAILED, GENERAL_FAILURE},
}


def check_event(event: object) -> None:
    """An event's fields are values the RFC 1928/1929 wire format can carry."""
    if isinstance(event, Greeting):
        assert len(event.methods) <= 255
        assert all(isinstance(m, int) and 0 <= m <= 255 for m in event.methods)
    elif isinstance(event, UserPassAuth):
        assert type(event.username) is bytes and type(event.password) is bytes
        assert len(event.username) <= 255 and len(event.password) <= 255
    elif isinstance(event, CommandRequest):
        assert type(event.command) is Command and type(event.address_type) is AddressType
        assert type(event.port) is int and 0 <= event.port <= 0xFFFF
        if event.address_type is AddressType.IPV4:
            assert str(ipaddress.IPv4Address(event.host)) == event.host
        elif event.address_type is AddressType.IPV6:
            assert ipaddress.IPv6Address(event.host).compressed == event.host
        else:
            assert 1 <= len(event.host) <= 255
            assert all(0x21 <= ord(c) <= 0x7E for c in event.host)
    else:
        assert isinstance(event, ConnectionClosed), event


def wire_of(event: Greeting | UserPassAuth | CommandRequest, rsv: int) -> bytes:
    """Encode a client message from scratch (not with the codec under test)."""
    if isinstance(event, Greeting):
        return bytes([5, len(event.methods), *event.methods])
    if isinstance(event, UserPassAuth):
        u, p = event.username, event.password
        return bytes([1, len(u)]) + u + bytes([len(p)]) + p
    if event.address_type is AddressType.DOMAINNAME:
        addr = domain(event.host.encode("ascii"))
    else:
        addr = ipaddress.ip_address(event.host).packed
    return request(event.command, event.address_type, addr, event.port, rsv)


def drive_policy(
    chunks: Iterable[bytes],
    eof: bool,
    policy: ServerPolicy,
    max_buffer: int = 65536,
    fused: bool = False,
) -> list[object]:
    """Like `drive`, with a given server policy, buffer limit and stricter checks.

    `fused`: each chunk goes in through receive() (receive_data + next_event in one).
    Only ProtocolError is caught: any other exception fails the test.
    """
    conn = Socks5ServerConnection(max_buffer)
    log: list[object] = []
    offered: tuple[int, ...] = ()

    def failed(exc: ProtocolError) -> list[object]:
        assert exc.reply in ERROR_REPLIES[exc.reason], exc
        assert conn.state is State.ERROR
        # ERROR is sticky: both entry points raise the same error again.
        for again in (conn.next_event, lambda: conn.receive_data(b"\x05")):
            with pytest.raises(ProtocolError) as info:
                again()
            assert (info.value.reason, info.value.reply) == (exc.reason, exc.reply)
        log.append(("error", exc.reason, exc.reply))
        return log

    for chunk in [*(c for c in chunks if c), *([b""] if eof else [])]:
        # receive() asks for the next event, which RELAYING and CLOSED refuse.
        use_receive = fused and conn.state not in (State.RELAYING, State.CLOSED)
        try:
            first = conn.receive(chunk) if use_receive else None
            if not use_receive:
                conn.receive_data(chunk)
        except ProtocolError as exc:
            return failed(exc)
        if first is not None and first is not NEED_DATA:
            check_event(first)
            if isinstance(first, Greeting):
                offered = first.methods
            log.append(first)
        while conn.state not in (State.RELAYING, State.CLOSED):
            state = conn.state
            message: ServerMessage
            if state is State.SEND_METHOD:
                message = MethodSelection(choose_method(offered, policy.acceptable))
            elif state is State.SEND_AUTH_STATUS:
                message = AuthStatus(policy.auth_ok)
            elif state is State.SEND_REPLY:
                message = CommandReply(policy.reply)
            else:
                try:
                    event = conn.next_event()
                except ProtocolError as exc:
                    return failed(exc)
                if event is NEED_DATA:
                    # After EOF a reading state always ends in an event or CLOSED.
                    assert conn.state is state and not conn.eof_received
                    break
                check_event(event)
                if isinstance(event, Greeting):
                    offered = event.methods
                log.append(event)
                continue
            log.append(("sent", conn.send(message)))
    # In CLOSED, bytes pipelined before the refusal may still sit in the buffer, and
    # bytes fed after it are dropped, so only RELAYING's trailing data is compared.
    trailing = conn.trailing_data if conn.state is State.RELAYING else None
    log.append(("end", conn.state, trailing))
    return log


def assert_reencodes(data: bytes, log: list[object]) -> None:
    """The events are exactly the bytes consumed, in order; the rest is trailing data."""
    offset = 0
    for item in log:
        if isinstance(item, (Greeting, UserPassAuth, CommandRequest)):
            rsv = data[offset + 2] if isinstance(item, CommandRequest) else 0
            wire = wire_of(item, rsv)
            assert data[offset : offset + len(wire)] == wire, (offset, item)
            offset += len(wire)
    end = log[-1]
    assert isinstance(end, tuple)
    if end[:2] == ("end", State.RELAYING):
        assert end[2] == data[offset:]


FIELD = st.one_of(st.binary(max_size=8), st.binary(min_size=250, max_size=255))
ADDRESS = st.one_of(
    st.binary(min_size=4, max_size=4).map(lambda b: b"\x01" + b),
    st.binary(min_size=16, max_size=16).map(lambda b: b"\x04" + b),
    st.text("abcz09.-", min_size=1, max_size=12).map(lambda t: b"\x03" + domain(t.encode())),
    st.sampled_from([b"a" * 255, b"!~" * 127 + b"x"]).map(lambda b: b"\x03" + domain(b)),
    st.binary(max_size=12).map(lambda b: b"\x03" + bytes([len(b)]) + b),  # Any bytes.
    st.binary(max_size=6).map(lambda b: bytes([2]) + b),  # Unknown ATYP.
)


@st.composite
def handshakes(draw: st.DrawFn, policy: ServerPolicy) -> bytes:
    """A client stream that mostly fits `policy`, then mutated and maybe truncated."""
    methods = draw(st.lists(st.sampled_from([0, 2, 1, 0x80, 0xFF]), max_size=4))
    # Mostly offer one it takes. (Rare branches test for 3, never for 0: hypothesis
    # draws the lower bound far more often than the others.)
    if policy.acceptable and draw(st.integers(0, 3)) < 3:
        at = draw(st.integers(0, len(methods)))
        methods.insert(at, draw(st.sampled_from(policy.acceptable)))
    parts = [bytes([5, len(methods), *methods])]
    chosen = choose_method(methods, policy.acceptable)
    # Sometimes the sub-negotiation the server did not ask for (or no sub-negotiation
    # where it did), so a message meets the wrong state.
    if (chosen == Method.USERNAME_PASSWORD) != (draw(st.integers(0, 9)) == 9):
        user, password = draw(FIELD), draw(FIELD)
        parts.append(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
    command = draw(st.sampled_from([1, 1, 1, 2, 3, 0, 0xFF]))
    port = draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
    parts.append(bytes([5, command, draw(st.sampled_from([0, 0, 1, 0xFF]))]))
    parts.append(draw(ADDRESS) + port)
    parts.append(draw(st.binary(max_size=32)))  # Early payload.
    data = bytearray(b"".join(parts))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3]))):
        at = position(draw, data)
        kind = draw(st.sampled_from(["replace", "insert", "delete"]))
        if kind == "insert":
            data[at:at] = bytes([draw(st.integers(0, 255))])
        elif at < len(data):
            data[at : at + 1] = b"" if kind == "delete" else bytes([draw(st.integers(0, 255))])
    if draw(st.integers(0, 3)) == 3:
        del data[len(data) - draw(st.integers(1, max(1, len(data)))) :]
    return bytes(data)


def position(draw: st.DrawFn, data: bytearray) -> int:
    """An index into `data`; hypothesis favours small integers, so count from either end."""
    at = draw(st.integers(0, len(data)))
    return len(data) - at if draw(st.booleans()) else at


def cut(draw: st.DrawFn, data: bytes) -> list[bytes]:
    edges = [0, *sorted(draw(st.sets(st.integers(0, len(data)), max_size=8))), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@st.composite
def policy_cases(draw: st.DrawFn) -> tuple[ServerPolicy, bytes, list[bytes]]:
    policy = draw(policies(ANY_ACCEPTABLE))
    data = draw(handshakes(policy))
    return policy, data, cut(draw, data)


# Valid bytes that put the codec in each reading state under the given methods.
READING_STATES: dict[str, tuple[bytes, tuple[int, ...]]] = {
    "greeting": (b"", (0, 2)),
    "auth": (GREETING_BOTH, (2, 0)),
    "request": (GREETING_NOAUTH, (0,)),
    "request_after_auth": (GREETING_BOTH + AUTH, (2,)),
}
# Arbitrary bytes, with the values the parsers branch on drawn more often.
SOUP = st.lists(
    st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 0xFF]), st.integers(0, 255)), max_size=80
).map(bytes)


@st.composite
def soup_cases(draw: st.DrawFn) -> tuple[ServerPolicy, bytes, list[bytes]]:
    prefix, acceptable = READING_STATES[draw(st.sampled_from(sorted(READING_STATES)))]
    policy = draw(policies(st.just(acceptable)))
    data = prefix + draw(SOUP)
    return policy, data, cut(draw, data)


def assert_chunking_invariant(
    policy: ServerPolicy, data: bytes, chunks: list[bytes], eof: bool
) -> list[object]:
    whole = drive_policy([data], eof, policy)
    assert_reencodes(data, whole)
    assert drive_policy(chunks, eof, policy) == whole
    assert drive_policy([bytes([b]) for b in data], eof, policy) == whole
    return whole


@settings(max_examples=200, deadline=None, database=None)
@given(case=policy_cases(), eof=st.booleans())
def test_every_server_answer_any_chunking_same_outcome(
    case: tuple[ServerPolicy, bytes, list[bytes]], eof: bool
) -> None:
    assert_chunking_invariant(*case, eof)


@settings(max_examples=200, deadline=None, database=None)
@given(case=soup_cases(), eof=st.booleans())
def test_arbitrary_bytes_in_each_reading_state(
    case: tuple[ServerPolicy, bytes, list[bytes]], eof: bool
) -> None:
    assert_chunking_invariant(*case, eof)


@settings(max_examples=100, deadline=None, database=None)
@given(case=policy_cases(), eof=st.booleans(), max_buffer=st.integers(1, 64))
def test_small_buffer_limits_only_add_overflow(
    case: tuple[ServerPolicy, bytes, list[bytes]], eof: bool, max_buffer: int
) -> None:
    """Overflow depends on chunking (consumed bytes free the buffer), nothing else does.

    Unconsumed input never exceeds what was fed, so input that fits the limit gives the
    same outcome in every chunking, and one that overflows in any chunking overflows
    when fed whole.
    """
    policy, data, chunks = case
    whole = drive_policy([data], eof, policy, max_buffer)
    assert overflowed(whole) == (len(data) > max_buffer)
    for feed in (chunks, [bytes([b]) for b in data]):
        got = drive_policy(feed, eof, policy, max_buffer)
        if not overflowed(whole):
            assert got == whole
        elif not overflowed(got):
            assert got == drive_policy(feed, eof, policy)  # the limit changed nothing


def overflowed(log: list[object]) -> bool:
    last = log[-1]
    return isinstance(last, tuple) and last[:2] == ("error", "buffer_overflow")


def test_every_reading_step_is_a_legal_transition() -> None:
    # next_event() takes the _READERS steps without _transition()'s check.
    for state, (_, after) in socks5_module._READERS.items():
        assert after in socks5_module._TRANSITIONS[state], (state, after)


@settings(max_examples=200, deadline=None, database=None)
@given(
    case=st.one_of(policy_cases(), soup_cases()), eof=st.booleans(), max_buffer=st.integers(1, 600)
)
def test_receive_is_receive_data_then_next_event(
    case: tuple[ServerPolicy, bytes, list[bytes]], eof: bool, max_buffer: int
) -> None:
    policy, _, chunks = case
    plain = drive_policy(chunks, eof, policy, max_buffer)
    assert drive_policy(chunks, eof, policy, max_buffer, fused=True) == plain


# --- one-step fast paths: the same outcome as the general calls ------------------------


def _outcome(call: Callable[[], object]) -> object:
    """What a codec call returned, or the type and text of what it raised."""
    try:
        return call()
    except (ProtocolError, LocalProtocolError) as exc:
        return (type(exc).__name__, str(exc))


def _codec_view(c: Socks5ServerConnection) -> tuple[object, ...]:
    return (c.state, c.trailing_data, c.eof_received)


_REQUEST_V4 = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x01\xbb"


@settings(max_examples=300, deadline=None, database=None)
@given(
    data=st.one_of(
        st.just(b"\x05\x01\x00"),
        st.binary(min_size=1, max_size=8),
        st.binary(max_size=4).map(lambda tail: b"\x05\x01\x00" + tail),
        st.sampled_from([b"\x05\x02\x00\x02", b"\x05\x01\x02", b"\x04\x01\x00", b"\x05\x00"]),
    ),
    before=st.sampled_from([b"", b"\x05", b"\x05\x01\x00"]),
    eof_first=st.booleans(),
)
def test_accept_no_auth_is_receive_then_selecting_no_auth(
    data: bytes, before: bytes, eof_first: bool
) -> None:
    fast, slow = Socks5ServerConnection(), Socks5ServerConnection()
    for c in (fast, slow):
        if before:
            c.receive(before)
            if c.state is State.SEND_METHOD:
                c.send(MethodSelection(Method.NO_AUTH))
        if eof_first:
            c.receive_data(b"")
    answer = fast.accept_no_auth(data)
    if answer is None:
        assert _codec_view(fast) == _codec_view(slow)  # nothing consumed, nothing changed
        return
    assert (before, eof_first) == (b"", False) and data == b"\x05\x01\x00"
    assert slow.receive(data) == Greeting((Method.NO_AUTH,))
    assert answer == slow.send(MethodSelection(Method.NO_AUTH)) == b"\x05\x00"
    assert _codec_view(fast) == _codec_view(slow) == (State.REQUEST, b"", False)
    # The method was recorded as offered: the rest of the handshake goes alike.
    assert fast.receive(_REQUEST_V4) == slow.receive(_REQUEST_V4)
    assert fast.send_success("127.0.0.1", 1) == slow.send_success("127.0.0.1", 1)


@settings(max_examples=300, deadline=None, database=None)
@given(
    address=st.one_of(
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(str),
        st.sampled_from(["example.com", "", "1.2.3", "256.1.1.1"]),
    ),
    port=st.one_of(st.integers(-2, 70000), st.sampled_from([0, 1, 65535])),
    state_after=st.sampled_from(["request", "reply", "relaying"]),
)
def test_send_success_is_send_of_a_success_reply(address: str, port: int, state_after: str) -> None:
    fast, slow = Socks5ServerConnection(), Socks5ServerConnection()
    for c in (fast, slow):
        assert c.accept_no_auth(b"\x05\x01\x00") == b"\x05\x00"
        if state_after != "request":
            c.receive(_REQUEST_V4)
        if state_after == "relaying":
            c.send_success("10.0.0.1", 80)
    got = _outcome(lambda: fast.send_success(address, port))
    want = _outcome(lambda: slow.send(CommandReply(Reply.SUCCEEDED, address, port)))
    assert got == want
    assert _codec_view(fast) == _codec_view(slow)
    # Twice: the second time the dotted quad comes from the encoder's memo.
    if fast.state is State.RELAYING and state_after == "reply":
        again, other = Socks5ServerConnection(), Socks5ServerConnection()
        for c in (again, other):
            c.accept_no_auth(b"\x05\x01\x00")
            c.receive(_REQUEST_V4)
        assert again.send_success(address, port) == other.send(
            CommandReply(Reply.SUCCEEDED, address, port)
        )
