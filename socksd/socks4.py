"""Sans-IO SOCKS4 and SOCKS4a server codec.

Owns: the SOCKS4/4a wire format and its handshake state machine (its transition
table over REQUEST, SEND_REPLY, RELAYING, CLOSED, ERROR): parsing a request (with
4a's hostname form) into `socksd.codec`'s `CommandRequest`, and encoding replies
given as `CommandReply` messages (REP 0x00 becomes 90 "granted", any other 91
"rejected or failed"), so the session drives both protocols alike.
Must not: do I/O or decide policy (whether a USERID is acceptable).

    request: VN=4 | CD (1 CONNECT, 2 BIND) | DSTPORT (2) | DSTIP (4) | USERID | NUL
             4a: DSTIP = 0.0.0.x (x != 0), then HOSTNAME | NUL
    reply:   VN=0 | CD (90..93) | DSTPORT (2) | DSTIP (4)

SOCKS4 has one request and one reply (two for BIND); there is no greeting and no
password. The USERID is kept in `userid`. `Socks4ServerConnection` satisfies
`socksd.codec.ServerCodec`, whose docstrings give each member's contract and what
`ProtocolError` and `LocalProtocolError` mean.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, NoReturn

from socksd.codec import (
    NEED_DATA,
    AddressType,
    BufferedCodec,
    Command,
    CommandReply,
    CommandRequest,
    Event,
    LocalProtocolError,
    NeedData,
    ProtocolError,
    Reply,
    ServerMessage,
    State,
    TransitionTable,
)
from socksd.socks5 import check_domain

if TYPE_CHECKING:
    from socksd.codec import ServerCodec

SOCKS4_VERSION: Final = 0x04
GRANTED: Final = 90
REJECTED: Final = 91
MAX_FIELD: Final = 255  # USERID and HOSTNAME: longer is refused (no RFC gives a limit)
_COMMANDS: Final = {1: Command.CONNECT, 2: Command.BIND}
_REJECT: Final = bytes([0, REJECTED, 0, 0, 0, 0, 0, 0])

# Members used on the per-connection path, as module globals: in Python 3.11 every
# `State.X` goes through EnumType.__getattr__'s lookup hook (~70 ns); a global is ~7 ns.
_REQUEST: Final = State.REQUEST
_SEND_REPLY: Final = State.SEND_REPLY
_RELAYING: Final = State.RELAYING
_CLOSED: Final = State.CLOSED
_ERROR: Final = State.ERROR
_IPV4: Final = AddressType.IPV4
_DOMAINNAME: Final = AddressType.DOMAINNAME
_SUCCEEDED: Final = Reply.SUCCEEDED

# The transition table: the SOCKS4 states and the steps between them. CLOSED is
# reached by EOF before a whole request, or by a failure reply; ERROR by a
# ProtocolError, including a buffer overflow (hence from SEND_REPLY and RELAYING
# too). SEND_REPLY -> SEND_REPLY is BIND's interim reply.
_TRANSITIONS: Final[TransitionTable] = {
    State.REQUEST: frozenset({State.SEND_REPLY, State.CLOSED, State.ERROR}),
    State.SEND_REPLY: frozenset({State.SEND_REPLY, State.RELAYING, State.CLOSED, State.ERROR}),
    State.RELAYING: frozenset({State.ERROR}),
    State.CLOSED: frozenset(),
    State.ERROR: frozenset(),
}
# States in which next_event() waits for our reply (or has nothing left to parse).
_AWAITING_SEND: Final = frozenset({State.SEND_REPLY, State.RELAYING})


def _encode(code: int, address: str | None, port: int) -> bytes:
    octets = b"\x00\x00\x00\x00"
    if address is not None and ":" not in address:
        parts = address.split(".")
        if len(parts) == 4 and all(p.isdigit() and int(p) < 256 for p in parts):
            octets = bytes(int(p) for p in parts)
    return bytes([0, code]) + port.to_bytes(2, "big") + octets


class Socks4ServerConnection(BufferedCodec):
    """One SOCKS4/4a client's request and reply(ies), as a `socksd.codec.ServerCodec`.

    Args:
        max_buffer: Most unconsumed input bytes held at any time.
    """

    __slots__ = ("_max_buffer", "_buffer", "_state", "_eof", "userid")

    def __init__(self, max_buffer: int = 65536) -> None:
        self._max_buffer = max_buffer
        self._buffer = bytearray()
        self._state = _REQUEST
        self._eof = False
        self.userid = b""

    @property
    def state(self) -> State:
        return self._state

    @property
    def trailing_data(self) -> bytes:
        return bytes(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """See `ServerCodec.receive_data`. In ``ERROR`` it raises ProtocolError
        ``"already_failed"``; after EOF, data is still buffered."""
        if self._state is _ERROR:
            raise ProtocolError("already_failed", _REJECT)
        if not data:
            self._eof = True
            return
        if self._state is _CLOSED:
            return
        if len(self._buffer) + len(data) > self._max_buffer:
            self._fail(ProtocolError("buffer_overflow", _REJECT))
        self._buffer += data

    def receive(self, data: bytes) -> Event | NeedData:
        """``receive_data(data)`` then ``next_event()`` (see `ServerCodec.receive`)."""
        self.receive_data(data)
        return self.next_event()

    def next_event(self) -> Event | NeedData:
        """See `ServerCodec.next_event`: produces only ``CommandRequest`` and
        ``ConnectionClosed``; ``NEED_DATA`` in ``SEND_REPLY`` and ``RELAYING``."""
        if self._state is not _REQUEST:
            if self._state in _AWAITING_SEND:
                return NEED_DATA
            raise LocalProtocolError(f"next_event() in {self._state.name}")
        try:
            parsed = self._parse()
        except ProtocolError as exc:
            self._fail(exc)
        if parsed is None:
            return self._no_message()
        event, consumed = parsed
        del self._buffer[:consumed]
        self._transition(_SEND_REPLY)
        return event

    def _parse(self) -> tuple[CommandRequest, int] | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != SOCKS4_VERSION:
            raise ProtocolError("bad_version", b"")
        if len(buf) < 2:
            return None
        command = _COMMANDS.get(buf[1])
        if command is None:
            raise ProtocolError("unknown_command", _REJECT)
        if len(buf) < 9:
            return None
        port = (buf[2] << 8) | buf[3]
        ip = bytes(buf[4:8])
        end = buf.find(b"\x00", 8, 8 + MAX_FIELD + 1)
        if end < 0:
            if len(buf) > 8 + MAX_FIELD:
                raise ProtocolError("userid_too_long", _REJECT)
            return None
        userid = bytes(buf[8:end])
        if ip[:3] == b"\x00\x00\x00" and ip[3] != 0:
            # SOCKS4a: the client could not resolve the name; it follows the USERID.
            name_end = buf.find(b"\x00", end + 1, end + 2 + MAX_FIELD)
            if name_end < 0:
                if len(buf) > end + 1 + MAX_FIELD:
                    raise ProtocolError("bad_domain_name", _REJECT)
                return None
            raw = bytes(buf[end + 1 : name_end])
            if check_domain(raw) is None:
                raise ProtocolError("bad_domain_name", _REJECT)
            self.userid = userid
            request = CommandRequest(command, _DOMAINNAME, raw.decode("ascii"), port)
            return request, name_end + 1
        self.userid = userid
        host = "%d.%d.%d.%d" % (ip[0], ip[1], ip[2], ip[3])  # noqa: UP031
        return CommandRequest(command, _IPV4, host, port), end + 1

    def send_success(self, address: str, port: int) -> bytes:
        """`send(CommandReply(Reply.SUCCEEDED, address, port))`, named as on the SOCKS5
        codec: the session ends every handshake with it, whichever codec it holds."""
        return self.send(CommandReply(_SUCCEEDED, address, port))

    def send(self, message: ServerMessage) -> bytes:
        """Encode a `CommandReply` (SOCKS5 REP values) as a SOCKS4 reply; an `interim`
        one (BIND's first) leaves the codec waiting for the final reply. Any other
        message, or any other state than ``SEND_REPLY``, raises LocalProtocolError."""
        if not isinstance(message, CommandReply) or self._state is not _SEND_REPLY:
            raise LocalProtocolError(f"cannot send {message!r} in {self._state.name}")
        ok = message.reply == _SUCCEEDED
        if message.interim and not ok:
            raise LocalProtocolError("an interim reply must be a success")
        data = _encode(GRANTED if ok else REJECTED, message.address, message.port)
        if not ok:
            self._transition(_CLOSED)  # the request is refused: the client is told, we close
        elif not message.interim:
            self._transition(_RELAYING)
        else:
            self._transition(_SEND_REPLY)  # BIND's first reply: the final one follows
        return data

    def _transition(self, new_state: State) -> None:
        if new_state not in _TRANSITIONS[self._state]:
            raise LocalProtocolError(f"{self._state.name} -> {new_state.name}")
        self._state = new_state

    def _fail(self, error: ProtocolError) -> NoReturn:
        self._transition(_ERROR)
        raise error


if TYPE_CHECKING:  # mypy proves the session can drive this codec through the interface
    _SERVER_CODEC: type[ServerCodec] = Socks4ServerConnection
