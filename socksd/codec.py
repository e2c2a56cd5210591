"""What every front door's server codec shares: its vocabulary, its errors, its interface.

Owns:
    The protocol-neutral side of a client handshake, which the session speaks whatever
    protocol the client came in with: the events a server codec produces
    (``Greeting``, ``UserPassAuth``, ``CommandRequest``, ``ConnectionClosed``), the
    messages the session answers them with (``MethodSelection``, ``AuthStatus``,
    ``CommandReply``), the values those carry (``Command``, ``AddressType``, ``Reply``,
    ``Method``: RFC 1928's numbers, the session's vocabulary, onto which SOCKS4 and HTTP
    map their own), the codec ``State``s, the ``NEED_DATA`` sentinel, the two errors
    and what each means (below, said here only), and ``ServerCodec``, the interface a
    session drives every codec through.

Must not:
    Know any wire format (``socksd.socks5``, ``socksd.socks4`` do, and re-use these
    names); import anything that does I/O, or any other socksd module (every codec
    imports this one).

The errors, the one place that says what they mean:

``ProtocolError``
    The client (the remote peer) broke its protocol. It is never our caller's fault.
    A connection codec raises it from ``receive_data()``, ``receive()`` or
    ``next_event()`` and stays in ``State.ERROR`` for good: the session writes the
    error's ``reply`` bytes, if any (the failure answer the protocol owes the client),
    then closes the connection. A stateless parser (``socksd.socks5_udp``) raises it
    for one bad datagram, which its caller drops.

``LocalProtocolError``
    Our caller misused the codec: a bug in socksd, never the client's doing (a
    message sent in the wrong state, a value the protocol cannot carry, a call after
    the conversation ended). It must crash loudly (the session's crash handler logs
    it); it is never caught to answer the client.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum, auto
from typing import Final, Protocol, TypeAlias

__all__ = [
    "NEED_DATA",
    "AddressType",
    "AuthStatus",
    "BufferedCodec",
    "Command",
    "CommandReply",
    "CommandRequest",
    "ConnectionClosed",
    "Event",
    "Greeting",
    "LocalProtocolError",
    "Method",
    "MethodSelection",
    "NeedData",
    "ProtocolError",
    "Reply",
    "ServerCodec",
    "ServerMessage",
    "State",
    "TransitionTable",
    "UserPassAuth",
]


# --- wire values (RFC 1928), the session's vocabulary -----------------------


class Method(IntEnum):
    """Authentication methods (RFC 1928 §3)."""

    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(IntEnum):
    """Request commands, the CMD field (RFC 1928 §4)."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(IntEnum):
    """Address types, the ATYP field (RFC 1928 §5)."""

    IPV4 = 0x01
    DOMAINNAME = 0x03
    IPV6 = 0x04


class Reply(IntEnum):
    """Reply codes, the REP field (RFC 1928 §6)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


# --- states -------------------------------------------------------------------


class State(Enum):
    """Where the handshake stands.

    ``SEND_*`` states wait for the server's ``send()``; ``GREETING``,
    ``AUTH`` and ``REQUEST`` wait for client input. ``RELAYING``, ``CLOSED``
    and ``ERROR`` are terminal for the codec. Each codec uses the states its
    protocol has (SOCKS4 starts in ``REQUEST``) and lists its legal steps in its
    own ``TransitionTable``.
    """

    # Members are singletons compared by identity: identity hashing is correct, and
    # Enum's default (hash of the name, in Python) showed up in the per-tunnel profile.
    __hash__ = object.__hash__

    GREETING = auto()
    SEND_METHOD = auto()
    AUTH = auto()
    SEND_AUTH_STATUS = auto()
    REQUEST = auto()
    SEND_REPLY = auto()
    RELAYING = auto()
    CLOSED = auto()
    ERROR = auto()


TransitionTable: TypeAlias = Mapping[State, frozenset[State]]
"""A codec's legal steps: each state it uses -> the states it may move to next."""


class NeedData(Enum):
    """Type of the ``NEED_DATA`` sentinel (an enum so mypy can narrow on it)."""

    NEED_DATA = auto()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA
"""Returned by ``next_event()`` when no event can be produced yet."""


# --- events (client -> server) --------------------------------------------

# Events and messages are slotted dataclasses, read-only by convention but not
# frozen: a frozen one is built through object.__setattr__ per field, ~5,000 more
# instructions each in CPython 3.11 (callgrind), and a tunnel builds three.


@dataclass(slots=True)
class Greeting:
    """Version identifier/method selection message (RFC 1928 §3).

    Attributes:
        methods: METHODS as offered, in the client's order; may hold values
            with no ``Method`` member, and may be empty.
    """

    methods: tuple[int, ...]


@dataclass(slots=True)
class UserPassAuth:
    """Username/password request (RFC 1929 §2); either field may be empty."""

    username: bytes
    password: bytes


@dataclass(slots=True)
class CommandRequest:
    """SOCKS request (RFC 1928 §4).

    Attributes:
        command: CMD.
        address_type: ATYP as sent.
        host: Dotted IPv4, compressed IPv6 text, or the domain name as sent
            (printable ASCII, not resolved, not normalised).
        port: DST.PORT, 0-65535 (0 is passed through; policy decides).
    """

    command: Command
    address_type: AddressType
    host: str
    port: int


@dataclass(slots=True)
class ConnectionClosed:
    """EOF was received and no complete message was pending."""


Event: TypeAlias = Greeting | UserPassAuth | CommandRequest | ConnectionClosed


# --- messages (server -> client) -------------------------------------------


@dataclass(slots=True)
class MethodSelection:
    """METHOD selection (RFC 1928 §3): ``NO_AUTH``, ``USERNAME_PASSWORD``
    (either only if offered) or ``NO_ACCEPTABLE``."""

    method: int


@dataclass(slots=True)
class AuthStatus:
    """Username/password status (RFC 1929 §2)."""

    ok: bool


@dataclass(slots=True)
class CommandReply:
    """Reply to a request (RFC 1928 §6).

    Attributes:
        reply: REP.
        address: BND.ADDR: IPv4 or IPv6 text (ATYP 1 or 4), a domain name
            (ATYP 3), or None for 0.0.0.0.
        port: BND.PORT.
    """

    reply: Reply
    address: str | None = None
    port: int = 0
    interim: bool = False  # BIND's first reply: the final one follows (RFC 1928 section 4)


ServerMessage: TypeAlias = MethodSelection | AuthStatus | CommandReply


# --- errors (what they mean: this module's docstring) -----------------------


class ProtocolError(Exception):
    """The client broke its protocol (or overran the buffer): send ``reply``, close.

    See this module's docstring for what the session does with it.

    Attributes:
        reason: snake_case cause, e.g. ``"bad_version"``.
        reply: Exact bytes to send before closing; may be empty.
    """

    def __init__(self, reason: str, reply: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply

    def __repr__(self) -> str:
        return f"ProtocolError(reason={self.reason!r}, reply={self.reply!r})"


class LocalProtocolError(Exception):
    """Our caller misused the codec, a bug in socksd: let it crash, never answer it.

    See this module's docstring. E.g. a send in the wrong state, an illegal message,
    ``next_event()`` after the handshake, or data after EOF.
    """


# --- the interface ------------------------------------------------------------


class BufferedCodec:
    """What a parse that found no whole message does, the same in every codec: wait
    for more, or after EOF end the conversation (state ``CLOSED``) and drop the partial
    message. A base of the codecs, which define ``_buffer``, ``_eof`` and their own
    checked ``_transition()``."""

    __slots__ = ()
    _buffer: bytearray
    _eof: bool

    def _transition(self, new_state: State) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _no_message(self) -> ConnectionClosed | NeedData:
        if not self._eof:
            return NEED_DATA
        self._buffer.clear()
        self._transition(State.CLOSED)
        return ConnectionClosed()


class ServerCodec(Protocol):
    """One client connection's handshake, whatever its front door: what a session drives.

    Sans-IO: the session feeds the codec what it reads from the client and writes
    what ``send()`` returns; the codec never touches a socket and decides no policy.
    ``Socks5ServerConnection`` and ``Socks4ServerConnection`` satisfy this; a new
    front door implements exactly these members (its constructor takes
    ``max_buffer``, the most unconsumed input it may hold) and the session drives it
    with no new phase logic.

    The conversation alternates. In a reading state (``GREETING``, ``AUTH``,
    ``REQUEST``) the codec parses input into an event; it then waits in the matching
    ``SEND_*`` state for the session's answer and parses nothing more until it comes
    (input that arrives meanwhile stays buffered)::

        event produced      state after it      the session's answer
        Greeting            SEND_METHOD         MethodSelection
        UserPassAuth        SEND_AUTH_STATUS    AuthStatus
        CommandRequest      SEND_REPLY          CommandReply, or send_success()
        ConnectionClosed    CLOSED              none: the client left

    A codec produces only the events its protocol has: one with no method
    negotiation (SOCKS4) starts in ``REQUEST`` and produces only ``CommandRequest``
    and ``ConnectionClosed``. Every conversation ends in a terminal state:
    ``RELAYING`` (a final success reply was sent: the session takes
    ``trailing_data``, hands the sockets to the relay and drops the codec),
    ``CLOSED`` (a refusal was sent, or the client left: write the answer, close) or
    ``ERROR`` (a ``ProtocolError`` was raised: write its ``reply``, close).

    Errors: only ``ProtocolError`` (the client's fault) and ``LocalProtocolError``
    (ours); see this module's docstring for what each means.
    """

    @property
    def state(self) -> State:
        """Where the conversation stands (read-only; see the table above)."""

    @property
    def trailing_data(self) -> bytes:
        """A copy of the unconsumed input; reading it consumes nothing.

        In ``SEND_REPLY`` and ``RELAYING`` it is exactly the bytes the client sent
        after its request (its first payload, sent before our reply), plus any fed
        since. The session gives them to the relay, which forwards them upstream:
        a codec must never drop or alter them.
        """

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the client; ``b""`` means EOF (the client half-closed).

        Parses nothing (``next_event()`` does). Buffers input in every live state,
        ``SEND_*`` and ``RELAYING`` included: the session feeds the client's early
        payload while it authenticates, connects or waits for BIND's peer. Input in
        ``CLOSED`` is discarded. EOF may be fed more than once; data after EOF is a
        caller bug (a codec may raise ``LocalProtocolError``).

        Raises:
            ProtocolError: The buffer would exceed ``max_buffer`` (reason
                ``"buffer_overflow"``, ``reply`` the failure answer owed in the
                current state), or the codec is already in ``ERROR``.
        """

    def receive(self, data: bytes) -> Event | NeedData:
        """``receive_data(data)`` then ``next_event()``, in one call.

        The session's step on every read during the handshake. Same results, same
        states and same exceptions as the two calls; a codec may parse ``data`` where
        it is when nothing is buffered (the SOCKS5 codec's fast path).
        """

    def next_event(self) -> Event | NeedData:
        """The next event from buffered input, or ``NEED_DATA``.

        The session calls it after each answer it sends, until ``NEED_DATA``, since
        the client may have pipelined its next message.

        Returns:
            An event (the state moves as the table above says); ``NEED_DATA`` if the
            buffered message is incomplete or the codec waits for ``send()``;
            ``ConnectionClosed()`` (state ``CLOSED``) once EOF was fed and no whole
            message is buffered, dropping any partial one.

        Raises:
            ProtocolError: The client broke the protocol; the state is ``ERROR``.
            LocalProtocolError: Called after the conversation ended (``CLOSED``,
                and for SOCKS5 ``RELAYING``); the session never does.
        """

    def send(self, message: ServerMessage) -> bytes:
        """Encode the session's answer to the last event and advance the state.

        Args:
            message: The answer the current state waits for (table above):

                - ``MethodSelection(method)``: a method the client offered moves to
                  its sub-negotiation (``AUTH``) or to ``REQUEST``;
                  ``Method.NO_ACCEPTABLE`` moves to ``CLOSED``.
                - ``AuthStatus(True)``: the credentials are accepted; on to
                  ``REQUEST``.
                - ``AuthStatus(False)``: refuse these credentials. The codec's
                  encoding of it ends the conversation (state ``CLOSED``): the
                  session writes it and closes.
                - ``CommandReply(Reply.SUCCEEDED, address, port)``: the tunnel is
                  open, state ``RELAYING``. With ``interim=True`` (BIND's first
                  reply, naming where we listen) the state stays ``SEND_REPLY``:
                  the final reply, naming the peer that connected, follows.
                - ``CommandReply(<any other Reply>)``: the request is refused,
                  state ``CLOSED``. A protocol with fewer answers maps the
                  ``Reply`` onto its own (SOCKS4 sends 91 for every failure).

        Returns:
            The bytes to write to the client, all of them, before relaying or
            closing.

        Raises:
            LocalProtocolError: A message the current state does not wait for, or
                a value the protocol cannot carry (a method the client did not
                offer, an interim failure, ...). The state is left unchanged.
        """

    def send_success(self, address: str, port: int) -> bytes:
        """``send(CommandReply(Reply.SUCCEEDED, address, port))``, same bytes, state
        (``RELAYING``) and exceptions.

        The final success reply, ``address``:``port`` being our end of the upstream
        connection (BND). Every tunnel ends its handshake with it, so a codec may
        encode it without building the message.
        """
