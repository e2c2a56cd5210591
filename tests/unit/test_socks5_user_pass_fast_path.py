"""The RFC 1929 fast paths of the SOCKS5 codec give what the generic steps give.

``accept_user_pass``, ``accept_credentials`` and ``accept_auth`` stand in for
``receive()`` + ``send(MethodSelection(USERNAME_PASSWORD))``, ``receive()`` returning
``UserPassAuth`` and ``send(AuthStatus(True))``. Each property drives two codecs fed
identically up to the step under test: one takes the fast path, the other the generic
steps. A fast path either declines (None), leaving every field of the codec as it was,
after which the caller's ``receive()`` behaves as on the twin; or it gives the same
bytes, values and state, and everything fed afterwards goes the same way on both.
"""

from collections.abc import Callable, Iterable
from typing import TypeVar

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from socksd.socks5 import (
    NEED_DATA,
    AddressType,
    AuthStatus,
    Command,
    CommandReply,
    CommandRequest,
    Greeting,
    LocalProtocolError,
    Method,
    MethodSelection,
    ProtocolError,
    Reply,
    Socks5ServerConnection,
    State,
    UserPassAuth,
    choose_method,
)
from tests.unit.test_socks5 import (
    AUTH,
    AUTH_FAILED,
    GREETING_BOTH,
    GREETING_NOAUTH,
    GREETING_USERPASS,
    PAYLOAD,
    REQ_DOMAIN,
    REQ_V4,
    _outcome,
)

# --- helpers -----------------------------------------------------------------------

T = TypeVar("T")
Step = tuple[str, object]  # ("receive", bytes) | ("data", bytes) | ("send", message)

# Ways to reach each state through the generic calls, so the fast paths meet every
# state, buffered input, EOF and ERROR.
SELECT_USER_PASS = MethodSelection(Method.USERNAME_PASSWORD)
TO_AUTH: list[Step] = [("receive", GREETING_USERPASS), ("send", SELECT_USER_PASS)]
TO_SEND_AUTH_STATUS: list[Step] = [*TO_AUTH, ("receive", AUTH)]
SETUPS: dict[str, list[Step]] = {
    "greeting": [],
    "greeting_partial": [("receive", b"\x05")],
    "greeting_partial_methods": [("receive", b"\x05\x02\x00")],
    "greeting_eof": [("data", b"")],
    "send_method": [("receive", GREETING_BOTH)],
    "auth": TO_AUTH,
    "auth_partial": [*TO_AUTH, ("receive", b"\x01")],
    "auth_eof": [*TO_AUTH, ("data", b"")],
    # The client sent the greeting and the first byte of its credentials in one go.
    "auth_pipelined": [("receive", GREETING_USERPASS + b"\x01"), ("send", SELECT_USER_PASS)],
    "send_auth_status": TO_SEND_AUTH_STATUS,
    "send_auth_status_pipelined": [*TO_AUTH, ("receive", AUTH + REQ_V4)],
    "request": [*TO_SEND_AUTH_STATUS, ("send", AuthStatus(True))],
    "request_no_auth": [("receive", GREETING_NOAUTH), ("send", MethodSelection(Method.NO_AUTH))],
    "send_reply": [*TO_SEND_AUTH_STATUS, ("send", AuthStatus(True)), ("receive", REQ_V4)],
    "relaying": [
        *TO_SEND_AUTH_STATUS,
        ("send", AuthStatus(True)),
        ("receive", REQ_V4),
        ("send", CommandReply(Reply.SUCCEEDED, "10.0.0.1", 80)),
    ],
    "closed_refused": [*TO_SEND_AUTH_STATUS, ("send", AuthStatus(False))],
    "closed_no_acceptable": [
        ("receive", GREETING_NOAUTH),
        ("send", MethodSelection(Method.NO_ACCEPTABLE)),
    ],
    "error_greeting": [("receive", b"\x04\x01\x00")],
    "error_auth": [*TO_AUTH, ("receive", b"\x02")],
}


def prepared(setup: str, max_buffer: int) -> Socks5ServerConnection:
    """A codec taken through SETUPS[setup] by the generic calls.

    A small ``max_buffer`` may overflow on the way: the codec then sits in ERROR (and
    later sends are refused), which is one more state to test from.
    """
    conn = Socks5ServerConnection(max_buffer)
    for kind, arg in SETUPS[setup]:
        try:
            if kind == "receive":
                assert isinstance(arg, bytes)
                conn.receive(arg)
            elif kind == "data":
                assert isinstance(arg, bytes)
                conn.receive_data(arg)
            else:
                conn.send(arg)  # type: ignore[arg-type]
        except (ProtocolError, LocalProtocolError):
            pass
    return conn


def twins(setup: str, max_buffer: int) -> tuple[Socks5ServerConnection, Socks5ServerConnection]:
    return prepared(setup, max_buffer), prepared(setup, max_buffer)


def full_view(c: Socks5ServerConnection) -> tuple[object, ...]:
    """Every field of the codec, so "changes nothing" means nothing at all."""
    error = None if c._error is None else (c._error.reason, c._error.reply)
    return (c.state, c.trailing_data, c.eof_received, c._offered, error, c._max_buffer)


def drive_on(c: Socks5ServerConnection, chunks: Iterable[bytes]) -> list[object]:
    """Feed ``chunks`` through receive() with a fixed server policy (select
    USERNAME/PASSWORD if offered, accept every credential, succeed every request),
    logging every return value and exception, then the codec's fields."""
    log: list[object] = []

    def step(call: Callable[[], object]) -> bool:
        result = _outcome(call)
        log.append(result)
        return isinstance(result, tuple) and result[0].endswith("Error")

    for chunk in chunks:
        if step(lambda chunk=chunk: c.receive(chunk)):  # type: ignore[misc]
            break
        for _ in range(8):  # answer, then parse what is pipelined, a few rounds
            state = c.state
            if state is State.SEND_METHOD:
                method = choose_method(tuple(sorted(c._offered)), (Method.USERNAME_PASSWORD,))
                failed = step(lambda m=method: c.send(MethodSelection(m)))  # type: ignore[misc]
            elif state is State.SEND_AUTH_STATUS:
                failed = step(lambda: c.send(AuthStatus(True)))
            elif state is State.SEND_REPLY:
                failed = step(lambda: c.send_success("10.0.0.1", 80))
            elif state in (State.GREETING, State.AUTH, State.REQUEST):
                event = _outcome(c.next_event)
                log.append(event)
                if event is NEED_DATA or isinstance(event, tuple):
                    break
                continue
            else:
                break
            if failed:
                break
    log.append(full_view(c))
    return log


# --- strategies ----------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """Draw from each strategy that often. (st.one_of flattens nested one_ofs and picks
    evenly among all their branches, so it cannot weight.)"""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


# Method values, with those the codec treats specially drawn more often.
METHOD = st.one_of(st.sampled_from([0, 1, 2, 2, 0x80, 0xFF]), st.integers(0, 255))


@st.composite
def greetings(draw: st.DrawFn) -> bytes:
    """A whole greeting, mostly offering X'02' among other methods."""
    methods = draw(st.lists(METHOD, max_size=254))
    if draw(st.integers(0, 3)) > 0:
        methods.insert(draw(st.integers(0, len(methods))), 2)
    return bytes([5, len(methods), *methods])


FIELD = st.one_of(
    st.binary(max_size=12),
    st.binary(min_size=250, max_size=255),
    st.binary(max_size=255),
)
SUB_NEGOTIATIONS = st.tuples(FIELD, FIELD).map(
    lambda up: bytes([1, len(up[0])]) + up[0] + bytes([len(up[1])]) + up[1]
)
BYTES = st.lists(
    st.one_of(st.sampled_from([0, 1, 2, 5, 0xFF]), st.integers(0, 255)), max_size=24
).map(bytes)


def variants(whole: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Whole messages, and the same cut short, with bytes after them, or one byte changed."""

    @st.composite
    def changed(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(whole))
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
        return bytes(data)

    @st.composite
    def cut_short(draw: st.DrawFn) -> bytes:
        data = draw(whole)
        return data[: draw(st.integers(0, len(data) - 1))]

    followed = st.tuples(whole, st.one_of(st.just(REQ_V4), BYTES.filter(bool)))
    return weighted(
        (3, whole),
        (1, cut_short()),
        (1, followed.map(lambda t: t[0] + t[1])),  # pipelined: the client did not wait
        (1, changed()),
        (1, BYTES),
    )


GREETING_DATA = weighted(
    (
        2,
        st.sampled_from(
            [GREETING_USERPASS, GREETING_BOTH, b"\x05\x02\x02\x00", GREETING_NOAUTH, b"\x05\x00"]
        ),
    ),
    (5, variants(greetings())),
)
CREDENTIAL_DATA = weighted(
    (2, st.sampled_from([AUTH, b"\x01\x00\x00", b"\x01\x00", b"\x02\x04user\x06secret"])),
    (5, variants(SUB_NEGOTIATIONS)),
)


@st.composite
def continuations(draw: st.DrawFn) -> list[bytes]:
    """What the client sends next: the rest of a handshake, cut anywhere, or noise."""
    rest = draw(
        st.one_of(
            st.sampled_from(
                [
                    AUTH + REQ_V4 + PAYLOAD,
                    REQ_V4 + PAYLOAD,
                    REQ_DOMAIN,
                    AUTH + REQ_DOMAIN,
                    GREETING_USERPASS + AUTH + REQ_V4,
                ]
            ),
            BYTES,
        )
    )
    edges = [0, *sorted(draw(st.sets(st.integers(0, len(rest)), max_size=3))), len(rest)]
    chunks = [rest[a:b] for a, b in zip(edges, edges[1:], strict=False) if rest[a:b]]
    if draw(st.booleans()):
        chunks.append(b"")  # EOF
    return chunks


def setups(usual: str) -> st.SearchStrategy[str]:
    """Mostly the state the fast path is for, so it is taken often; any other too."""
    return weighted((3, st.just(usual)), (2, st.sampled_from(sorted(SETUPS))))


MAX_BUFFER = weighted((3, st.just(65536)), (1, st.integers(1, 600)))


def whole_greeting_offering_user_pass(data: bytes) -> bool:
    return len(data) >= 2 and data[0] == 5 and len(data) == 2 + data[1] and 2 in data[2:]


def whole_sub_negotiation(data: bytes) -> bool:
    if len(data) < 3 or data[0] != 1:
        return False
    plen_at = 2 + data[1]
    return plen_at < len(data) and len(data) == plen_at + 1 + data[plen_at]


def fresh_in(c: Socks5ServerConnection, state: State) -> bool:
    return c.state is state and not c.trailing_data and not c.eof_received and c._error is None


# --- properties ------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, database=None)
@given(setup=setups("greeting"), data=GREETING_DATA, later=continuations(), max_buffer=MAX_BUFFER)
def test_accept_user_pass_is_receive_then_selecting_user_pass(
    setup: str, data: bytes, later: list[bytes], max_buffer: int
) -> None:
    fast, slow = twins(setup, max_buffer)
    before = full_view(fast)
    answer = fast.accept_user_pass(data)
    # It takes exactly the inputs it promises to, and no others.
    expected = (
        fresh_in(slow, State.GREETING)
        and whole_greeting_offering_user_pass(data)
        and len(data) <= max_buffer
    )
    assert (answer is not None) == expected
    event(f"from {setup}: {'taken' if expected else 'declined'}")
    if answer is None:
        assert full_view(fast) == before == full_view(slow)  # nothing changed at all
        # The caller then takes receive(), which goes as on a codec never asked.
        assert drive_on(fast, [data, *later]) == drive_on(slow, [data, *later])
        return
    assert slow.receive(data) == Greeting(tuple(data[2:]))
    assert answer == slow.send(SELECT_USER_PASS) == b"\x05\x02"
    assert full_view(fast) == full_view(slow)
    assert fast.state is State.AUTH and fast.trailing_data == b""
    assert drive_on(fast, later) == drive_on(slow, later)


@settings(max_examples=400, deadline=None, database=None)
@given(setup=setups("auth"), data=CREDENTIAL_DATA, later=continuations(), max_buffer=MAX_BUFFER)
def test_accept_credentials_is_receive_of_user_pass_auth(
    setup: str, data: bytes, later: list[bytes], max_buffer: int
) -> None:
    fast, slow = twins(setup, max_buffer)
    before = full_view(fast)
    got = fast.accept_credentials(data)
    expected = (
        fresh_in(slow, State.AUTH) and whole_sub_negotiation(data) and len(data) <= max_buffer
    )
    assert (got is not None) == expected
    event(f"from {setup}: {'taken' if expected else 'declined'}")
    if got is None:
        assert full_view(fast) == before == full_view(slow)
        assert drive_on(fast, [data, *later]) == drive_on(slow, [data, *later])
        return
    username, password = got
    assert type(username) is bytes and type(password) is bytes
    assert slow.receive(data) == UserPassAuth(username, password)
    assert full_view(fast) == full_view(slow)
    assert fast.state is State.SEND_AUTH_STATUS and fast.trailing_data == b""
    # Both answers (the fast one and send()) lead to the same rest of the handshake.
    assert fast.accept_auth() == slow.send(AuthStatus(True)) == b"\x01\x00"
    assert drive_on(fast, later) == drive_on(slow, later)


@settings(max_examples=300, deadline=None, database=None)
@given(setup=setups("send_auth_status"), later=continuations(), max_buffer=MAX_BUFFER)
def test_accept_auth_is_send_of_auth_success(
    setup: str, later: list[bytes], max_buffer: int
) -> None:
    fast, slow = twins(setup, max_buffer)
    before = full_view(fast)
    got = _outcome(fast.accept_auth)
    assert got == _outcome(lambda: slow.send(AuthStatus(True)))
    accepted = got == b"\x01\x00"
    event(f"from {setup}: {'accepted' if accepted else 'refused'}")
    if accepted:
        assert before[0] is State.SEND_AUTH_STATUS and fast.state is State.REQUEST
    else:  # refused, as send() refuses: a LocalProtocolError, nothing changed
        assert isinstance(got, tuple) and got[0] == "LocalProtocolError"
        assert full_view(fast) == before
    assert full_view(fast) == full_view(slow)
    assert drive_on(fast, later) == drive_on(slow, later)


@settings(max_examples=300, deadline=None, database=None)
@given(
    greeting=GREETING_DATA,
    credentials=CREDENTIAL_DATA,
    later=continuations(),
    max_buffer=MAX_BUFFER,
)
def test_a_handshake_taking_every_fast_path_it_can_ends_as_the_generic_one(
    greeting: bytes, credentials: bytes, later: list[bytes], max_buffer: int
) -> None:
    """How the session uses them: each fast path first, receive() when it declines."""
    fast, slow = Socks5ServerConnection(max_buffer), Socks5ServerConnection(max_buffer)
    fast_log: list[object] = []
    answer = fast.accept_user_pass(greeting)
    if answer is None:
        fast_log += drive_on(fast, [greeting])[:-1]
    else:
        fast_log += [Greeting(tuple(greeting[2:])), answer, NEED_DATA]
    credentials_got = fast.accept_credentials(credentials)
    if credentials_got is None:
        fast_log += drive_on(fast, [credentials])[:-1]
    else:
        fast_log += [UserPassAuth(*credentials_got), fast.accept_auth(), NEED_DATA]
    event(
        f"greeting {'fast' if answer else 'generic'}, credentials "
        f"{'fast' if credentials_got else 'generic'}"
    )
    fast_log += drive_on(fast, later)
    slow_log = drive_on(slow, [greeting])[:-1] + drive_on(slow, [credentials])[:-1]
    slow_log += drive_on(slow, later)
    assert fast_log == slow_log


# --- vectors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("greeting", "offered"),
    [
        (b"\x05\x02\x00\x02", {0, 2}),  # curl, PySocks, browsers with credentials
        (b"\x05\x01\x02", {2}),  # python-socks, many scrapers
        (b"\x05\x02\x02\x00", {0, 2}),  # the general check
        (b"\x05\x03\x00\x01\x02", {0, 1, 2}),
        (b"\x05\x02\x02\x02", {2}),
    ],
)
def test_accept_user_pass_vectors(greeting: bytes, offered: set[int]) -> None:
    conn = Socks5ServerConnection()
    assert conn.accept_user_pass(greeting) == b"\x05\x02"
    assert conn.state is State.AUTH and conn.trailing_data == b""
    assert conn._offered == offered


@pytest.mark.parametrize(
    "greeting",
    [
        b"",
        b"\x05",
        b"\x05\x01",
        b"\x05\x00",  # NMETHODS 0
        b"\x05\x01\x00",  # no X'02'
        b"\x05\x02\x00\x01",
        b"\x04\x01\x02",  # not SOCKS5
        b"\x05\x02\x00",  # cut short
        b"\x05\x01\x02\x01",  # the credentials' first byte pipelined
        b"\x05\x02\x00\x02" + AUTH,
    ],
)
def test_accept_user_pass_declines(greeting: bytes) -> None:
    conn = Socks5ServerConnection()
    assert conn.accept_user_pass(greeting) is None
    assert full_view(conn) == full_view(Socks5ServerConnection())


def test_accept_user_pass_declines_what_overflows_the_buffer() -> None:
    conn = Socks5ServerConnection(max_buffer=3)
    assert conn.accept_user_pass(GREETING_BOTH) is None
    with pytest.raises(ProtocolError, match="buffer_overflow"):
        conn.receive(GREETING_BOTH)
    assert Socks5ServerConnection(max_buffer=3).accept_user_pass(GREETING_USERPASS) == b"\x05\x02"


def test_accept_user_pass_only_once() -> None:
    conn = Socks5ServerConnection()
    assert conn.accept_user_pass(GREETING_BOTH) == b"\x05\x02"
    assert conn.accept_user_pass(GREETING_BOTH) is None
    assert conn.state is State.AUTH


CONNECT_LOCALHOST_80 = CommandRequest(Command.CONNECT, AddressType.IPV4, "127.0.0.1", 80)  # REQ_V4


def auth_state() -> Socks5ServerConnection:
    conn = Socks5ServerConnection()
    assert conn.accept_user_pass(GREETING_BOTH) == b"\x05\x02"
    return conn


@pytest.mark.parametrize(
    ("wire", "username", "password"),
    [
        (AUTH, b"user", b"secret"),
        (b"\x01\x00\x06secret", b"", b"secret"),  # ULEN 0 parses; policy refuses
        (b"\x01\x04user\x00", b"user", b""),  # PLEN 0
        (b"\x01\x00\x00", b"", b""),
        (b"\x01\xff" + b"u" * 255 + b"\xff" + b"p" * 255, b"u" * 255, b"p" * 255),
        (b"\x01\x03\x00\x01\xff\x02\x01\x00", b"\x00\x01\xff", b"\x01\x00"),
    ],
)
def test_accept_credentials_vectors(wire: bytes, username: bytes, password: bytes) -> None:
    conn = auth_state()
    assert conn.accept_credentials(wire) == (username, password)
    assert (conn.state, conn.trailing_data) == (State.SEND_AUTH_STATUS, b"")
    assert conn.accept_auth() == b"\x01\x00"
    assert conn.state is State.REQUEST
    assert conn.receive(REQ_V4) == CONNECT_LOCALHOST_80
    assert conn.send_success("10.0.0.1", 80) == b"\x05\x00\x00\x01\x0a\x00\x00\x01\x00\x50"


def test_bad_auth_version_is_declined_then_raised_by_receive() -> None:
    conn = auth_state()
    assert conn.accept_credentials(b"\x05\x04user\x06secret") is None
    assert conn.state is State.AUTH
    with pytest.raises(ProtocolError) as info:
        conn.receive(b"\x05\x04user\x06secret")
    assert (info.value.reason, info.value.reply) == ("bad_auth_version", AUTH_FAILED)


def test_pipelined_credentials_and_request_are_left_to_receive() -> None:
    """The choice made: with bytes after the sub-negotiation the fast path declines,
    so after accept_auth() nothing is ever buffered; receive() keeps them instead."""
    conn = auth_state()
    assert conn.accept_credentials(AUTH + REQ_V4 + PAYLOAD) is None
    assert conn.state is State.AUTH and conn.trailing_data == b""
    assert conn.receive(AUTH + REQ_V4 + PAYLOAD) == UserPassAuth(b"user", b"secret")
    assert conn.trailing_data == REQ_V4 + PAYLOAD
    assert conn.send(AuthStatus(True)) == b"\x01\x00"
    assert isinstance(conn.next_event(), CommandRequest)
    assert conn.trailing_data == PAYLOAD


@pytest.mark.parametrize("wire", [b"", b"\x01", b"\x01\x04user", b"\x01\x04user\x06secre"])
def test_partial_credentials_are_left_to_receive(wire: bytes) -> None:
    conn = auth_state()
    assert conn.accept_credentials(wire) is None
    assert full_view(conn) == full_view(auth_state())


@pytest.mark.parametrize("setup", sorted(set(SETUPS) - {"send_auth_status"}))
def test_accept_auth_out_of_turn_raises_and_changes_nothing(setup: str) -> None:
    conn = prepared(setup, 65536)
    if conn.state is State.SEND_AUTH_STATUS:  # the pipelined setup also lands there
        return
    before = full_view(conn)
    with pytest.raises(LocalProtocolError, match="cannot send AuthStatus in"):
        conn.accept_auth()
    assert full_view(conn) == before


def test_the_fast_handshake_on_the_wire() -> None:
    """curl's authenticated CONNECT, every message through a fast path."""
    conn = Socks5ServerConnection()
    wire = conn.accept_user_pass(b"\x05\x02\x00\x02")
    assert wire == b"\x05\x02"
    assert conn.accept_credentials(AUTH) == (b"user", b"secret")
    wire += conn.accept_auth()
    event = conn.receive(REQ_V4 + PAYLOAD)
    assert event == CONNECT_LOCALHOST_80
    wire += conn.send_success("10.0.0.1", 1080)
    assert wire == b"\x05\x02" + b"\x01\x00" + b"\x05\x00\x00\x01\x0a\x00\x00\x01\x04\x38"
    assert conn.state is State.RELAYING and conn.trailing_data == PAYLOAD
