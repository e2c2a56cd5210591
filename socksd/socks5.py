"""Sans-IO SOCKS5 server codec (RFC 1928, with RFC 1929 username/password).

Owns:
    The server side of the SOCKS5 wire format and handshake state machine:
    parsing the client's greeting, RFC 1929 sub-negotiation and request into
    ``socksd.codec``'s events, encoding its messages as the server's answers, SOCKS5's
    transition table and one-step fast paths, bounding buffered input, and keeping
    every byte the client sent after its request (``trailing_data``) for the relay to
    forward. Also the SOCKS5 address helpers (``encode_address``, ``decode_address``,
    ``check_domain``) and ``choose_method``.

Must not:
    Import socket, time, logging or anything else that does I/O; decide
    policy (which method, whether credentials are good, which reply code);
    resolve names; define protocol-neutral names (events, messages, states, errors
    and RFC 1928's enums are ``socksd.codec``'s, re-exported here so
    ``from socksd.socks5 import Reply`` keeps working).

``Socks5ServerConnection`` satisfies ``socksd.codec.ServerCodec``, whose docstrings
give the contract a session relies on and what ``ProtocolError`` and
``LocalProtocolError`` mean.

Shape (like h11)::

    conn = Socks5ServerConnection(max_buffer=65536)
    conn.receive_data(chunk)                  # b"" means EOF
    event = conn.next_event()                 # an event, or NEED_DATA
    wire = conn.send(MethodSelection(Method.NO_AUTH))

After each event the server must answer with ``send()`` before the codec
parses further input (``next_event()`` returns ``NEED_DATA`` meanwhile, and
pipelined input stays buffered). A successful ``CommandReply`` moves the codec
to ``RELAYING``; the caller then takes ``trailing_data`` and drops the codec.
"""

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Final, Literal, NoReturn, TypeAlias

# The shared vocabulary (socksd.codec), used here and re-exported: every name of
# `from socksd.socks5 import Reply, ...` keeps working; written once, in codec.py.
from socksd.codec import *  # noqa: F403
from socksd.codec import __all__ as _SHARED

__all__ = [
    "Socks5ServerConnection",
    "check_domain",
    "choose_method",
    "decode_address",
    "encode_address",
]
__all__ += _SHARED

SOCKS_VERSION: Final = 0x05  # RFC 1928 §3: VER is X'05' in every message.
AUTH_VERSION: Final = 0x01  # RFC 1929 §2: sub-negotiation VER is X'01'.

# Members used on the per-connection path, as module globals: in Python 3.11 every
# `State.X` goes through EnumType.__getattr__'s lookup hook (~70 ns, which the
# interpreter cannot specialise); a global is ~7 ns.
_GREETING: Final = State.GREETING
_SEND_METHOD: Final = State.SEND_METHOD
_AUTH: Final = State.AUTH
_SEND_AUTH_STATUS: Final = State.SEND_AUTH_STATUS
_REQUEST: Final = State.REQUEST
_SEND_REPLY: Final = State.SEND_REPLY
_RELAYING: Final = State.RELAYING
_CLOSED: Final = State.CLOSED
_IPV4: Final = AddressType.IPV4
_DOMAINNAME: Final = AddressType.DOMAINNAME
_SUCCEEDED: Final = Reply.SUCCEEDED


# --- encoding ---------------------------------------------------------------


def _ipv4_packed(text: str) -> bytes | None:
    """The 4 bytes of a canonical dotted quad ("10.0.0.1"), else None."""
    try:
        a, b, c, d = text.split(".")
        octets = bytes((int(a), int(b), int(c), int(d)))
    except ValueError:  # not four parts, not numbers, or an octet over 255
        return None
    # int() also takes " 1", "+1", "01", "1_0": only the canonical form round-trips.
    if "%d.%d.%d.%d" % tuple(octets) != text:  # noqa: UP031 - hot path
        return None
    return octets


_ENCODED_IPV4: dict[str, bytes] = {}  # dotted quad -> ATYP + 4 bytes (bounded memo)
_REPLY_HEADS: Final[Mapping[int, bytes]] = {r: bytes([SOCKS_VERSION, r, 0x00]) for r in Reply}
_SUCCESS_HEAD: Final = _REPLY_HEADS[Reply.SUCCEEDED]


def encode_address(address: str | None) -> bytes:
    """Encode ATYP + BND.ADDR (RFC 1928 §5)."""
    if address is None:
        return bytes([AddressType.IPV4]) + bytes(4)
    if not isinstance(address, str):
        # ip_address() would also take packed bytes or an int; refuse both.
        raise LocalProtocolError(f"bad BND.ADDR {address!r}")
    encoded = _ENCODED_IPV4.get(address)
    if encoded is not None:  # a worker's replies name its few egress IPs over and over
        return encoded
    packed = _ipv4_packed(address)
    if packed is not None:  # the common case (a dotted quad from getsockname): no ipaddress
        encoded = bytes([AddressType.IPV4]) + packed
        if len(_ENCODED_IPV4) < 1024:
            _ENCODED_IPV4[address] = encoded
        return encoded
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raw = check_domain(address.encode()) if address.isascii() else None
        if raw is None:
            raise LocalProtocolError(f"bad BND.ADDR {address!r}") from None
        return bytes([AddressType.DOMAINNAME, len(raw)]) + raw
    atyp = AddressType.IPV4 if ip.version == 4 else AddressType.IPV6
    return bytes([atyp]) + ip.packed


def _encode_reply(reply: Reply, address: str | None = None, port: int = 0) -> bytes:
    """Encode VER REP RSV ATYP BND.ADDR BND.PORT (RFC 1928 §6)."""
    encoded = _ENCODED_IPV4.get(address) if type(address) is str else None
    return _REPLY_HEADS[reply] + (encoded or encode_address(address)) + port.to_bytes(2, "big")


# RFC 1928 §3: X'FF' tells the client to close; the answer to a greeting we
# will not serve.
_NO_ACCEPTABLE: Final = bytes([SOCKS_VERSION, Method.NO_ACCEPTABLE])
# RFC 1929 §2: any non-zero STATUS is failure and the server closes.
_AUTH_FAILURE: Final = bytes([AUTH_VERSION, 0x01])
_AUTH_SUCCESS: Final = bytes([AUTH_VERSION, 0x00])
_GENERAL_FAILURE: Final = _encode_reply(Reply.GENERAL_FAILURE)
# The failure replies a request the parser refuses is owed (RFC 1928 §6).
_COMMAND_NOT_SUPPORTED: Final = _encode_reply(Reply.COMMAND_NOT_SUPPORTED)
_ADDRESS_TYPE_NOT_SUPPORTED: Final = _encode_reply(Reply.ADDRESS_TYPE_NOT_SUPPORTED)
_HOST_UNREACHABLE: Final = _encode_reply(Reply.HOST_UNREACHABLE)

# Reply owed to the client if its input overruns the buffer in each state:
# the failure answer to the message being read or awaiting our answer.
_OVERFLOW_REPLY: Final[Mapping[State, bytes]] = {
    State.SEND_METHOD: _NO_ACCEPTABLE,
    State.AUTH: _AUTH_FAILURE,
    State.SEND_AUTH_STATUS: _AUTH_FAILURE,
    State.REQUEST: _GENERAL_FAILURE,
    State.SEND_REPLY: _GENERAL_FAILURE,
    State.RELAYING: b"",  # Our success reply is already on the wire.
}


# --- parsing ----------------------------------------------------------------

# Each parser sees the unconsumed input and returns (event, bytes consumed),
# None if the message is incomplete, or raises ProtocolError. Errors are
# raised as soon as the offending byte is present, so the outcome depends
# only on the input, never on how it was chunked.
_Parser: TypeAlias = Callable[[bytes | bytearray], tuple[Event, int] | None]


def check_domain(raw: bytes) -> bytes | None:
    """Return ``raw`` if it is a usable DOMAINNAME, else None.

    RFC 1928 §5 gives only a length octet. Restricting to printable ASCII
    without spaces keeps NULs and control characters (which make
    ``getaddrinfo`` raise ValueError, or poison logs) out of the server.
    """
    if not 1 <= len(raw) <= 255:
        return None
    if any(not 0x21 <= b <= 0x7E for b in raw):
        return None
    return raw


def decode_address(atyp: AddressType, raw: bytes) -> str | None:
    """DST.ADDR's text: dotted IPv4, compressed IPv6, or the domain name as sent;
    None for a domain name `check_domain` refuses."""
    if atyp is _IPV4:
        return "%d.%d.%d.%d" % (raw[0], raw[1], raw[2], raw[3])  # noqa: UP031 - hot path
    if atyp is AddressType.IPV6:
        return ipaddress.IPv6Address(raw).compressed
    return raw.decode("ascii") if check_domain(raw) is not None else None


def _parse_greeting(buf: bytes | bytearray) -> tuple[Event, int] | None:
    # RFC 1928 §3: VER(1) NMETHODS(1) METHODS(NMETHODS).
    if not buf:
        return None
    if buf[0] != SOCKS_VERSION:
        # Not a SOCKS5 client: RFC 1928 defines nothing we could answer.
        raise ProtocolError("bad_version", b"")
    if len(buf) < 2:
        return None
    end = 2 + buf[1]
    if len(buf) < end:
        return None
    # NMETHODS is 1-255 in the RFC; 0 is passed through and policy answers
    # X'FF' because nothing was offered.
    return Greeting(tuple(buf[2:end])), end


def _parse_auth(buf: bytes | bytearray) -> tuple[Event, int] | None:
    # RFC 1929 §2: VER(1) ULEN(1) UNAME(ULEN) PLEN(1) PASSWD(PLEN).
    if not buf:
        return None
    if buf[0] != AUTH_VERSION:
        raise ProtocolError("bad_auth_version", _AUTH_FAILURE)
    if len(buf) < 2:
        return None
    plen_at = 2 + buf[1]
    if len(buf) <= plen_at:
        return None
    end = plen_at + 1 + buf[plen_at]
    if len(buf) < end:
        return None
    # ULEN/PLEN of 0 violate RFC 1929's 1-255 but parse fine; policy rejects.
    event = UserPassAuth(bytes(buf[2:plen_at]), bytes(buf[plen_at + 1 : end]))
    return event, end


# Byte -> member by dict: calling the Enum class costs ~1 us per call on the hot path.
_COMMANDS: Final[Mapping[int, Command]] = {int(c): c for c in Command}
_ADDRESS_TYPES: Final[Mapping[int, AddressType]] = {int(a): a for a in AddressType}
_REPLIES: Final[Mapping[int, Reply]] = {int(r): r for r in Reply}

_FIXED_ADDRESS_LEN: Final[Mapping[AddressType, int]] = {
    AddressType.IPV4: 4,
    AddressType.IPV6: 16,
}


def _parse_request(buf: bytes | bytearray) -> tuple[Event, int] | None:
    # RFC 1928 §4: VER(1) CMD(1) RSV(1) ATYP(1) DST.ADDR(var) DST.PORT(2).
    size = len(buf)
    if size >= 10 and buf[3] == 0x01 and buf[0] == SOCKS_VERSION:
        # The usual request, a whole IPv4 one, in one step; the same result as below.
        command = _COMMANDS.get(buf[1])
        if command is not None:
            quad = "%d.%d.%d.%d" % (buf[4], buf[5], buf[6], buf[7])  # noqa: UP031
            return CommandRequest(command, _IPV4, quad, (buf[8] << 8) | buf[9]), 10
    if size < 1:
        return None
    if buf[0] != SOCKS_VERSION:
        raise ProtocolError("bad_version", _GENERAL_FAILURE)
    if size < 2:
        return None
    command = _COMMANDS.get(buf[1])
    if command is None:
        raise ProtocolError("unknown_command", _COMMAND_NOT_SUPPORTED)
    if size < 4:
        return None
    # buf[2] is RSV: RFC 1928 only calls it reserved, so it is ignored.
    atyp = _ADDRESS_TYPES.get(buf[3])
    if atyp is None:
        raise ProtocolError("unknown_address_type", _ADDRESS_TYPE_NOT_SUPPORTED)
    if atyp is _DOMAINNAME:
        # RFC 1928 §5: one length octet, then the name, no terminating NUL.
        if size < 5:
            return None
        addr_start, addr_end = 5, 5 + buf[4]
    else:
        addr_start, addr_end = 4, 4 + _FIXED_ADDRESS_LEN[atyp]
    if size < addr_end:
        return None
    host = decode_address(atyp, bytes(buf[addr_start:addr_end]))
    if host is None:
        raise ProtocolError("bad_domain_name", _HOST_UNREACHABLE)
    end = addr_end + 2
    if size < end:
        return None
    port = (buf[addr_end] << 8) | buf[addr_end + 1]
    return CommandRequest(command, atyp, host, port), end


# States that read client input: (parser, state after its event).
_READERS: Final[Mapping[State, tuple[_Parser, State]]] = {
    State.GREETING: (_parse_greeting, State.SEND_METHOD),
    State.AUTH: (_parse_auth, State.SEND_AUTH_STATUS),
    State.REQUEST: (_parse_request, State.SEND_REPLY),
}

_AWAITING_SEND: Final = frozenset({State.SEND_METHOD, State.SEND_AUTH_STATUS, State.SEND_REPLY})
# States in which next_event() with nothing buffered simply waits.
_LIVE: Final = frozenset(_READERS) | _AWAITING_SEND

# The transition table. CLOSED is reached by EOF from reading states, by a
# refusing send() from SEND_* states; ERROR by a ProtocolError, including a
# buffer overflow (hence from SEND_* and RELAYING too).
_TRANSITIONS: Final[TransitionTable] = {
    State.GREETING: frozenset({State.SEND_METHOD, State.CLOSED, State.ERROR}),
    State.SEND_METHOD: frozenset({State.AUTH, State.REQUEST, State.CLOSED, State.ERROR}),
    State.AUTH: frozenset({State.SEND_AUTH_STATUS, State.CLOSED, State.ERROR}),
    State.SEND_AUTH_STATUS: frozenset({State.REQUEST, State.CLOSED, State.ERROR}),
    State.REQUEST: frozenset({State.SEND_REPLY, State.CLOSED, State.ERROR}),
    State.SEND_REPLY: frozenset({State.SEND_REPLY, State.RELAYING, State.CLOSED, State.ERROR}),
    State.RELAYING: frozenset({State.ERROR}),
    State.CLOSED: frozenset(),
    State.ERROR: frozenset(),
}

# The answer selecting each method we can serve.
_SELECTED: Final[Mapping[int, bytes]] = {
    m: bytes([SOCKS_VERSION, m]) for m in (Method.NO_AUTH, Method.USERNAME_PASSWORD)
}

_NONE_OFFERED: Final[frozenset[int]] = frozenset()
# What curl, PySocks, python-socks and browsers send without credentials: VER 5, one
# method, NO AUTH.
_NO_AUTH_ONLY: Final = bytes([SOCKS_VERSION, 1, Method.NO_AUTH])
_NO_AUTH_OFFERED: Final[frozenset[int]] = frozenset({Method.NO_AUTH})
_NO_AUTH_SELECTED: Final = _SELECTED[Method.NO_AUTH]
# What clients with credentials send: python-socks and many scrapers offer USERNAME/
# PASSWORD alone; curl, PySocks and browsers offer NO AUTH and USERNAME/PASSWORD.
_USER_PASS: Final = int(Method.USERNAME_PASSWORD)
_USER_PASS_ONLY: Final = bytes([SOCKS_VERSION, 1, _USER_PASS])
_USER_PASS_OFFERED: Final[frozenset[int]] = frozenset(_USER_PASS_ONLY[2:])
_NO_AUTH_OR_USER_PASS: Final = bytes([SOCKS_VERSION, 2, Method.NO_AUTH, _USER_PASS])
_NO_AUTH_OR_USER_PASS_OFFERED: Final[frozenset[int]] = frozenset(_NO_AUTH_OR_USER_PASS[2:])
_USER_PASS_SELECTED: Final = _SELECTED[Method.USERNAME_PASSWORD]

# Methods we can run the sub-negotiation for, and where each leads.
_AFTER_METHOD: Final[Mapping[int, State]] = {
    Method.NO_AUTH: State.REQUEST,
    Method.USERNAME_PASSWORD: State.AUTH,
}


def choose_method(offered: Sequence[int], acceptable: Sequence[int]) -> int:
    """Pick the server's preferred method among those the client offered.

    Args:
        offered: METHODS from the client's ``Greeting``.
        acceptable: Methods the server allows, most preferred first.

    Returns:
        The first of ``acceptable`` present in ``offered``, or
        ``Method.NO_ACCEPTABLE`` (RFC 1928 §3).
    """
    for method in acceptable:  # both are short: tuple membership beats a frozenset
        if method in offered:
            return method
    return Method.NO_ACCEPTABLE


class Socks5ServerConnection(BufferedCodec):
    """One client connection's SOCKS5 handshake, from greeting to reply.

    Args:
        max_buffer: Most unconsumed input bytes held at any time. The largest
            handshake message is 513 bytes (RFC 1929 with 255-byte fields),
            so smaller limits may refuse legitimate clients.

    Raises:
        ValueError: ``max_buffer`` is not positive.
    """

    __slots__ = ("_max_buffer", "_buffer", "_state", "_eof", "_offered", "_error")

    def __init__(self, max_buffer: int = 65536) -> None:
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be positive, got {max_buffer}")
        self._max_buffer = max_buffer
        self._buffer = bytearray()
        self._state = _GREETING
        self._eof = False
        self._offered: frozenset[int] = _NONE_OFFERED
        self._error: ProtocolError | None = None

    @property
    def state(self) -> State:
        """The current state."""
        return self._state

    @property
    def trailing_data(self) -> bytes:
        """Unconsumed input; after the request, the client's first payload.

        Reading does not consume it. In ``SEND_REPLY`` and ``RELAYING`` these
        are exactly the bytes that followed the request, plus anything fed
        since.
        """
        return bytes(self._buffer)

    @property
    def eof_received(self) -> bool:
        """Whether ``receive_data(b"")`` was called (the client half-closed)."""
        return self._eof

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the client; ``b""`` means EOF.

        Input is buffered in every live state (including ``SEND_*`` and
        ``RELAYING``) and discarded in ``CLOSED``. EOF may be repeated.

        Args:
            data: Bytes read from the client socket.

        Raises:
            ProtocolError: Unconsumed input would exceed ``max_buffer``
                (reason ``"buffer_overflow"``), or the codec is already in
                ``ERROR`` (the original error again).
            LocalProtocolError: Non-empty data after EOF.
        """
        if self._error is not None:
            self._raise_if_failed()
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() after EOF")
            return
        if not data:
            self._eof = True
            return
        if self._state is _CLOSED:
            return  # The handshake was refused; nothing will read this.
        if len(self._buffer) + len(data) > self._max_buffer:
            self._fail(ProtocolError("buffer_overflow", self._overflow_reply(data)))
        self._buffer += data

    def receive(self, data: bytes) -> Event | Literal[NeedData.NEED_DATA]:
        """``receive_data(data)`` then ``next_event()``, in one call.

        The server's usual step. When nothing is buffered and ``data`` holds a whole
        message, it is parsed where it is (no copy into the buffer and out again);
        anything else takes the two calls' path. Same results, same exceptions.
        """
        if data and not self._buffer and self._error is None and not self._eof:
            reader = _READERS.get(self._state)
            if reader is not None and len(data) <= self._max_buffer:
                parse, next_state = reader
                try:
                    parsed = parse(data)
                except ProtocolError as exc:
                    self._fail(exc)
                if parsed is not None:
                    event, consumed = parsed
                    if consumed < len(data):
                        self._buffer += data[consumed:]  # pipelined: kept for later
                    if next_state is _SEND_METHOD:
                        self._offered = frozenset(event.methods)  # type: ignore[union-attr]
                    self._state = next_state  # a legal step, as in next_event()
                    return event
        self.receive_data(data)
        return self.next_event()

    def accept_no_auth(self, data: bytes) -> bytes | None:
        """The commonest greeting and its answer in one step, for a server that
        accepts NO AUTH.

        When ``data`` is exactly ``05 01 00`` (NO AUTH is the only method offered and
        nothing follows it) and nothing is buffered, returns the answer selecting it
        and moves to ``REQUEST``: the same bytes and state as ``receive(data)`` then
        ``send(MethodSelection(Method.NO_AUTH))``, without the event and the message
        in between (~16,000 of a tunnel's ~219,000 instructions under callgrind).
        Returns None for any other input and changes nothing: use ``receive()``.
        """
        if (
            data != _NO_AUTH_ONLY
            or self._state is not _GREETING
            or self._buffer
            or self._eof
            or self._error is not None
        ):
            return None
        self._offered = _NO_AUTH_OFFERED
        self._state = _REQUEST
        return _NO_AUTH_SELECTED

    def accept_user_pass(self, data: bytes) -> bytes | None:
        """A greeting offering USERNAME/PASSWORD and its answer in one step, for a
        server that accepts only USERNAME/PASSWORD.

        When ``data`` is exactly one whole greeting (VER 5, NMETHODS, NMETHODS
        methods, nothing after it) whose methods include X'02', and nothing is
        buffered, records the methods offered, moves to ``AUTH`` and returns the
        answer selecting USERNAME/PASSWORD: the same bytes and state as
        ``receive(data)`` then ``send(MethodSelection(Method.USERNAME_PASSWORD))``,
        without the event and the message in between. With ``accept_credentials()``
        and ``accept_auth()`` a whole authenticated handshake in the codec costs
        ~22,500 instructions instead of ~46,300 (callgrind, bench/codec_handshakes.py).
        ``05 01 02`` and ``05 02 00 02`` are compared as constants; other greetings
        are checked byte by byte. Returns None for any other input (a partial,
        pipelined or malformed greeting, one without X'02', one over ``max_buffer``)
        and changes nothing: use ``receive()``.
        """
        if data == _USER_PASS_ONLY:
            offered = _USER_PASS_OFFERED
        elif data == _NO_AUTH_OR_USER_PASS:
            offered = _NO_AUTH_OR_USER_PASS_OFFERED
        else:
            size = len(data)
            if (
                size < 3  # NMETHODS 0 offers nothing, so not X'02' either
                or data[0] != SOCKS_VERSION
                or data[1] + 2 != size  # incomplete, or followed by more bytes
                or _USER_PASS not in data[2:]
            ):
                return None
            offered = frozenset(data[2:])
        if (
            self._state is not _GREETING
            or self._buffer
            or self._eof
            or self._error is not None
            or len(data) > self._max_buffer  # receive() would raise buffer_overflow
        ):
            return None
        self._offered = offered
        self._state = _AUTH  # GREETING -> SEND_METHOD -> AUTH: legal steps
        return _USER_PASS_SELECTED

    def accept_credentials(self, data: bytes) -> tuple[bytes, bytes] | None:
        """An RFC 1929 username/password request, parsed in one step.

        In ``AUTH``, with nothing buffered, when ``data`` is exactly one whole
        sub-negotiation (VER 1, ULEN, UNAME, PLEN, PASSWD, nothing after it), returns
        ``(username, password)`` and moves to ``SEND_AUTH_STATUS``: the same values
        and state as ``receive(data)`` returning ``UserPassAuth(username, password)``,
        without the event. Either field may be empty, as there. Returns None for any
        other input and changes nothing: use ``receive()``, which raises the
        ProtocolError a bad VER deserves, waits for the rest of a partial message,
        and keeps bytes pipelined after a whole one (a client sending its request
        without waiting) for ``next_event()`` after the answer. Refusing those here
        keeps this path's promise simple: after ``accept_auth()`` nothing is
        buffered.
        """
        if self._state is not _AUTH or self._buffer or self._eof or self._error is not None:
            return None
        size = len(data)
        if size < 3 or data[0] != AUTH_VERSION or size > self._max_buffer:
            return None
        plen_at = 2 + data[1]
        if plen_at >= size or plen_at + 1 + data[plen_at] != size:
            return None  # incomplete, or followed by more bytes
        self._state = _SEND_AUTH_STATUS  # AUTH -> SEND_AUTH_STATUS: a legal step
        return data[2:plen_at], data[plen_at + 1 :]

    def accept_auth(self) -> bytes:
        """``send(AuthStatus(True))`` without building the message: accept the
        credentials, move to ``REQUEST``. Same bytes, state and exceptions
        (LocalProtocolError outside ``SEND_AUTH_STATUS``, state unchanged)."""
        if self._state is not _SEND_AUTH_STATUS:
            self._expect(State.SEND_AUTH_STATUS, AuthStatus(True))
        self._state = _REQUEST  # SEND_AUTH_STATUS -> REQUEST: a legal step
        return _AUTH_SUCCESS

    def next_event(self) -> Event | Literal[NeedData.NEED_DATA]:
        """Parse the next client message, if complete.

        Returns:
            An event; ``NEED_DATA`` if the message is incomplete or the codec
            waits for ``send()``; ``ConnectionClosed()`` (state becomes
            ``CLOSED``) after EOF if no complete message is buffered, dropping
            any partial one.

        Raises:
            ProtocolError: The client broke the protocol; state becomes (or
                already was) ``ERROR``.
            LocalProtocolError: Called in ``RELAYING`` or ``CLOSED``.
        """
        if self._error is not None:
            self._raise_if_failed()
        if not self._buffer and not self._eof and self._state in _LIVE:
            return NEED_DATA  # nothing to parse (the usual call after an answer)
        reader = _READERS.get(self._state)
        if reader is None:
            if self._state in _AWAITING_SEND:
                return NEED_DATA
            raise LocalProtocolError(f"next_event() in {self._state.name}")
        parse, next_state = reader
        try:
            parsed = parse(self._buffer)
        except ProtocolError as exc:
            self._fail(exc)
        if parsed is None:
            return self._no_message()
        event, consumed = parsed
        del self._buffer[:consumed]
        if next_state is _SEND_METHOD:
            self._offered = frozenset(event.methods)  # type: ignore[union-attr]
        # No _transition() check: every _READERS entry is a legal step (unit-tested).
        self._state = next_state
        return event

    def send(self, message: ServerMessage) -> bytes:
        """Encode the server's answer and advance the state.

        Args:
            message: ``MethodSelection`` in ``SEND_METHOD``, ``AuthStatus`` in
                ``SEND_AUTH_STATUS`` or ``CommandReply`` in ``SEND_REPLY``.

        Returns:
            The bytes to write to the client.

        Raises:
            LocalProtocolError: Wrong state for the message, or a value RFC
                1928/1929 does not allow here. The state is left unchanged.
        """
        # isinstance(), not `match`: a class pattern costs ~70 ns a case in 3.11.
        if isinstance(message, CommandReply):
            data, next_state = self._encode_command_reply(message)
        elif isinstance(message, MethodSelection):
            data, next_state = self._encode_method(message)
        elif isinstance(message, AuthStatus):
            self._expect(State.SEND_AUTH_STATUS, message)
            # RFC 1929 §2: on failure the server MUST close the connection.
            if message.ok:
                data, next_state = _AUTH_SUCCESS, State.REQUEST
            else:
                data, next_state = _AUTH_FAILURE, State.CLOSED
        else:
            raise LocalProtocolError(f"cannot send {message!r}")
        self._transition(next_state)
        return data

    def send_success(self, address: str, port: int) -> bytes:
        """``send(CommandReply(Reply.SUCCEEDED, address, port))`` without building the
        message: the final reply of every tunnel, so the common case (BND a dotted
        quad) skips the dispatch. Same bytes, state and exceptions."""
        if self._state is _SEND_REPLY and type(port) is int and 0 <= port <= 0xFFFF:
            encoded = _ENCODED_IPV4.get(address)
            if encoded is not None:
                self._state = _RELAYING  # SEND_REPLY -> RELAYING: a legal step
                return _SUCCESS_HEAD + encoded + port.to_bytes(2, "big")
        return self.send(CommandReply(_SUCCEEDED, address, port))

    def _encode_method(self, message: MethodSelection) -> tuple[bytes, State]:
        if self._state is not _SEND_METHOD:
            self._expect(State.SEND_METHOD, message)
        method = message.method
        if method == 0xFF:  # Method.NO_ACCEPTABLE
            # RFC 1928 §3: the client MUST close; we will not read more.
            return _NO_ACCEPTABLE, _CLOSED
        next_state = _AFTER_METHOD.get(method)
        if next_state is None:
            raise LocalProtocolError(f"method {method!r} is not implemented")
        if method not in self._offered:
            # RFC 1928 §3: the server selects from the methods given.
            raise LocalProtocolError(f"method {method!r} was not offered")
        return _SELECTED[method], next_state

    def _encode_command_reply(self, message: CommandReply) -> tuple[bytes, State]:
        if self._state is not _SEND_REPLY:
            self._expect(State.SEND_REPLY, message)
        if message.reply is _SUCCEEDED and not message.interim and type(message.address) is str:
            # The usual reply (success, BND a dotted quad seen before): from the memo.
            encoded = _ENCODED_IPV4.get(message.address)
            port = message.port
            if encoded is not None and type(port) is int and 0 <= port <= 0xFFFF:
                return _SUCCESS_HEAD + encoded + port.to_bytes(2, "big"), _RELAYING
        reply = _REPLIES.get(message.reply) if isinstance(message.reply, int) else None
        if reply is None:
            raise LocalProtocolError(f"unknown reply {message.reply!r}")
        port = message.port
        if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
            raise LocalProtocolError(f"bad BND.PORT {port!r}")
        if message.interim and reply is not _SUCCEEDED:
            raise LocalProtocolError("an interim reply must be a success")
        data = _encode_reply(reply, message.address, port)
        if reply is _SUCCEEDED:
            # BIND's first reply keeps the codec here: the final one follows.
            return data, _SEND_REPLY if message.interim else _RELAYING
        # RFC 1928 §6: after a failure reply the server closes the connection.
        return data, _CLOSED

    def _expect(self, state: State, message: ServerMessage) -> None:
        if self._state is not state:
            name = type(message).__name__
            raise LocalProtocolError(f"cannot send {name} in {self._state.name}")

    def _transition(self, new_state: State) -> None:
        if new_state not in _TRANSITIONS[self._state]:
            raise LocalProtocolError(f"{self._state.name} -> {new_state.name}")
        self._state = new_state

    def _overflow_reply(self, data: bytes) -> bytes:
        if self._state is State.GREETING:
            # Answer X'FF' only if this looks like a SOCKS5 client at all.
            first = (self._buffer or data)[:1]
            return _NO_ACCEPTABLE if first == bytes([SOCKS_VERSION]) else b""
        return _OVERFLOW_REPLY[self._state]

    def _fail(self, error: ProtocolError) -> NoReturn:
        self._transition(State.ERROR)
        self._error = error
        raise error

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            # A fresh instance: re-raising one object grows its traceback.
            raise ProtocolError(self._error.reason, self._error.reply)


if TYPE_CHECKING:  # mypy proves the session can drive this codec through the interface
    _SERVER_CODEC: type[ServerCodec] = Socks5ServerConnection
