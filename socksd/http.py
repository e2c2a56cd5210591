"""The HTTP proxy front door (RFC 9110 / RFC 9112), sans-IO, on the SOCKS listener.

Owns:
    ``HttpServerConnection``: one client's request head parsed with h11 (bounded size
    and header count), mapped onto the session's vocabulary (``socksd.codec``): a
    ``Greeting`` that offers what the request carries (``Proxy-Authorization: Basic``
    is method 0x02, none is 0x00), ``UserPassAuth`` from it, and a ``CommandRequest``
    (CONNECT) for ``CONNECT host:port`` or an absolute-form request
    (``GET http://host/path``); the answers as HTTP responses: 200 for a CONNECT
    tunnel, 407 with ``Proxy-Authenticate``, 403, 408, 502, 504, 400, 431; and for an
    absolute-form request the request the origin gets (``origin``), whose exchange
    `socksd.forwarding` carries on with the same h11 connection.

Must not:
    Touch sockets, decide policy (the session does: users, rules, limits, egress), or
    relay bytes (the relay does, as for a SOCKS tunnel).

Absolute-form requests (only ``http://`` URLs) go to their origin in origin form with
Host from the URL, ``Proxy-*`` and the hop-by-hop fields removed (RFC 9110 section
7.6.1) and ``Connection: close``: every request gets its own upstream, so the next
one on a kept-alive client connection (to any host) is admitted, resolved and
connected anew, and the origin, closing first, keeps the TIME_WAIT.
"""

from __future__ import annotations

import binascii
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, NoReturn
from urllib.parse import SplitResult, urlsplit

import h11

from socksd.codec import (
    NEED_DATA,
    AddressType,
    AuthStatus,
    Command,
    CommandReply,
    CommandRequest,
    ConnectionClosed,
    Event,
    Greeting,
    LocalProtocolError,
    Method,
    MethodSelection,
    NeedData,
    ProtocolError,
    Reply,
    ServerMessage,
    State,
    UserPassAuth,
)

HEAD_MAX: Final = 16 * 1024  # bytes of a request head (line and headers)
TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")  # a field name (RFC 9110 section 5.1)
_NAME = re.compile(r"[A-Za-z0-9._-]+")  # a host name or an IPv4 address
_IPV6 = re.compile(r"[0-9A-Fa-f:.]+")  # an IPv6 address (out of its brackets)
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_FAST_METHODS = frozenset({b"CONNECT", b"GET", b"HEAD"})
_VISIBLE = re.compile(rb"[\x21-\x7e]+")  # a request target (RFC 9112 section 3.2)
FIELD_VALUE = re.compile(rb"[\t \x21-\x7e\x80-\xff]*")  # no CR, LF or other controls
MAX_HEADERS: Final = 100
_NO_CREDENTIALS = (Method.NO_AUTH,)
_WITH_CREDENTIALS = (Method.NO_AUTH, Method.USERNAME_PASSWORD)
# RFC 9110 section 7.6.1: meant for one hop only, never forwarded (Transfer-Encoding is
# too, but a request's body goes on framed as the client framed it, and h11 frames a
# response for the client: `hop_by_hop()` says which).
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# The session's reply codes as HTTP statuses.
STATUS_OF_REPLY: Final = {
    Reply.GENERAL_FAILURE: 502,
    Reply.NOT_ALLOWED: 403,
    Reply.NETWORK_UNREACHABLE: 502,
    Reply.HOST_UNREACHABLE: 502,
    Reply.CONNECTION_REFUSED: 502,
    Reply.TTL_EXPIRED: 504,
    Reply.COMMAND_NOT_SUPPORTED: 405,
    Reply.ADDRESS_TYPE_NOT_SUPPORTED: 400,
}
_TIMEOUTS = frozenset({"connect_timeout", "dns_timeout"})  # 504 whatever the reply code
_REASONS = {
    200: b"Connection established",
    400: b"Bad Request",
    403: b"Forbidden",
    405: b"Method Not Allowed",
    407: b"Proxy Authentication Required",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    504: b"Gateway Timeout",
}


# The SOCKS reply code of a `tunnel_closed` line for a request refused before it named
# a target (0: no answer was sent): the line of every protocol says "refused" alike.
REPLY_OF_STATUS: Final = {
    0: Reply.GENERAL_FAILURE,
    400: Reply.GENERAL_FAILURE,
    403: Reply.NOT_ALLOWED,
    405: Reply.COMMAND_NOT_SUPPORTED,
    407: Reply.NOT_ALLOWED,
    408: Reply.TTL_EXPIRED,
    431: Reply.GENERAL_FAILURE,
}


def response(status: int, extra: bytes = b"") -> bytes:
    """A complete response with no body to speak of, closing the connection."""
    body = b"%d %s\n" % (status, _REASONS[status])
    return (
        b"HTTP/1.1 %d %s\r\n%sContent-Type: text/plain\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (status, _REASONS[status], extra, len(body), body)
    )


_AUTH_REQUIRED = response(407, b'Proxy-Authenticate: Basic realm="socksd"\r\n')
_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


@dataclass(frozen=True, slots=True)
class FastRequest:
    """A plain GET or HEAD the fast path took without h11: what its exchange needs."""

    head: bytes  # the client's head as it came (h11 reads it again if need be)
    method: bytes
    origin: bytes  # the head the origin gets
    keep_alive: bool  # HTTP/1.1 and no "Connection: close"


class HttpServerConnection:
    """One HTTP client's request, from its head to the tunnel (``ServerCodec``). Its
    buffering is h11's (or `_rest`'s), not ``BufferedCodec``'s."""

    __slots__ = ("_h11", "_state", "_request", "_credentials", "origin", "fast", "_rest", "status")

    def __init__(
        self, max_buffer: int, parser: h11.Connection | None = None, ahead: bytes = b""
    ) -> None:
        """`parser` / `ahead`: the client's h11 connection, or the bytes it sent ahead,
        when this is its next request on a kept-alive connection."""
        # The head is bounded by HEAD_MAX (431 over it), not by the SOCKS allowance.
        # Made only when the fast paths below do not take the request.
        self._h11 = parser
        self._rest = ahead  # input not parsed yet (ahead, or after a fast-path head)
        self._state = State.GREETING
        self._request: CommandRequest | None = None
        self._credentials: tuple[bytes, bytes] | None = None
        # An absolute-form request: for the origin, as h11 read it, or as the fast path did.
        self.origin: h11.Request | None = None
        self.fast: FastRequest | None = None
        self.status = 0  # the status of the response sent, once one was

    @property
    def state(self) -> State:
        return self._state

    @property
    def trailing_data(self) -> bytes:
        if self._h11 is None:
            return self._rest
        return bytes(self._h11.trailing_data[0])

    @property
    def forwards(self) -> bool:
        """An absolute-form request: the origin's response is the answer."""
        return self.origin is not None or self.fast is not None

    @property
    def method(self) -> bytes:
        """A forwarded request's method."""
        if self.fast is not None:
            return self.fast.method
        assert self.origin is not None
        return self.origin.method

    @property
    def buffered(self) -> bool:
        """Bytes of a next request are in (a kept-alive connection's pipelining)."""
        return bool(self._rest) or (self._h11 is not None and bool(self._h11.trailing_data[0]))

    def take(self) -> tuple[h11.Connection | None, h11.Request | FastRequest, bytes]:
        """For the exchange of an absolute-form request: the client's h11 connection
        (its body, its response, the next request) and the request, or None, the fast
        path's request and what the client sent after it."""
        if self.fast is not None:
            return None, self.fast, self._rest
        assert self._h11 is not None and self.origin is not None
        return self._h11, self.origin, b""

    def _parser(self) -> h11.Connection:
        if self._h11 is None:
            self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_MAX)
            if self._rest:
                self._h11.receive_data(self._rest)
                self._rest = b""
        return self._h11

    def receive_data(self, data: bytes) -> None:
        if self._state is State.CLOSED:
            return
        if self._state is State.ERROR:
            raise ProtocolError("already_failed")
        if self._h11 is None and self._state is not State.GREETING:
            self._rest += data  # after a fast-path head: early payload for the relay
            return
        try:
            self._parser().receive_data(data)
        except RuntimeError as exc:  # data after EOF
            raise LocalProtocolError(str(exc)) from None

    def receive(self, data: bytes) -> Event | NeedData:
        if self._h11 is None and self._state is State.GREETING and not self._rest:
            greeting = self._fast_head(data)
            if greeting is not None:
                return greeting
        self.receive_data(data)
        return self.next_event()

    def _fast_head(self, data: bytes) -> Greeting | None:
        """A whole, plain `CONNECT host:port HTTP/1.1`, or `GET`/`HEAD http://...`
        without a body, in one read (what clients send): parsed here without h11;
        anything else (None) goes to h11, which also names what is wrong with it. h11
        costs ~23 us a request head, this ~5 us, and a tunnel costs ~160 us in all."""
        if not data.endswith(b"\r\n\r\n"):
            return None
        method = data[: data.find(b" ")]
        if method not in _FAST_METHODS:
            return None
        if len(data) > HEAD_MAX or data.count(b"\r\n\r\n") != 1 or b"\n\n" in data:
            return None
        lines = data[:-4].split(b"\r\n")
        if len(lines) > MAX_HEADERS:
            return None
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1":
            return None
        headers = []
        raw = []
        has_host = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not TOKEN.fullmatch(name) or not FIELD_VALUE.fullmatch(value):
                return None
            lower = name.lower()
            if lower in _FRAMING or (lower == b"host" and has_host):
                return None  # h11 judges bodies and repeated Hosts
            has_host = has_host or lower == b"host"
            value = value.strip(b" \t")
            headers.append((lower, value))
            raw.append(name)
        if not has_host:
            return None
        if method == b"CONNECT":
            host, port = _authority(parts[1].decode("ascii", "replace"))
        else:
            host, port = self._fast_forward(data, method, parts[1], headers, raw)
        if host is None:
            return None
        self._request = CommandRequest(Command.CONNECT, _address_type(host), host, port)
        self._credentials = self._basic(headers)
        self._state = State.SEND_METHOD
        return Greeting(_WITH_CREDENTIALS if self._credentials else _NO_CREDENTIALS)

    def _fast_forward(
        self,
        data: bytes,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        raw: list[bytes],
    ) -> tuple[str | None, int]:
        """`GET http://host/path`: the origin's head as `_origin_request()` makes it
        (tests/unit/test_forwarding.py holds the two to the same bytes); (None, 0)
        for a target the h11 path should judge."""
        if not target.startswith(b"http://") or not _VISIBLE.fullmatch(target) or b"#" in target:
            return None, 0
        rest = target[7:].decode("ascii")
        cut = len(rest)
        for mark in ("/", "?"):
            at = rest.find(mark)
            if 0 <= at < cut:
                cut = at
        userinfo, _, authority = rest[:cut].rpartition("@")
        if "[" in userinfo or "]" in userinfo or not _bracketed_ok(authority):
            return None, 0  # urlsplit judges brackets (400 for all but an IPv6 host)
        host, port = _authority(authority, default_port=80)
        if host is None:
            return None, 0
        path, _, query = rest[cut:].partition("?")
        path = (path or "/") + ("?" + query if query else "")
        drop = hop_by_hop(headers)
        lines = [b"%s %s HTTP/1.1" % (method, path.encode()), b"Host: " + authority.encode()]
        for (lower, value), name in zip(headers, raw, strict=True):
            if lower in drop or lower == b"host" or lower.startswith(b"proxy-"):
                continue
            lines.append(name + b": " + value)
        lines.append(b"Connection: close")
        keep_alive = True
        for lower, value in headers:
            if lower == b"connection" and b"close" in (
                token.strip().lower() for token in value.split(b",")
            ):
                keep_alive = False
        origin = b"\r\n".join(lines) + b"\r\n\r\n"
        self.fast = FastRequest(data, method, origin, keep_alive)
        return host, port

    def next_event(self) -> Event | NeedData:
        state = self._state
        if state is State.GREETING:
            return self._read_head()
        if state is State.AUTH:
            assert self._credentials is not None
            self._state = State.SEND_AUTH_STATUS
            return UserPassAuth(*self._credentials)
        if state is State.REQUEST:
            assert self._request is not None
            self._state = State.SEND_REPLY
            return self._request
        if state in (State.CLOSED, State.RELAYING):
            raise LocalProtocolError(f"next_event() in {state.name}")
        return NEED_DATA

    def _read_head(self) -> Event | NeedData:
        # h11 bounds only a head still incomplete: one that came whole in one read is
        # measured here.
        parser = self._parser()
        buffered = parser.trailing_data[0]
        end = buffered.find(b"\r\n\r\n", 0, HEAD_MAX + 4)
        if end > HEAD_MAX or (end < 0 and len(buffered) > HEAD_MAX):
            self._fail(431, "http_head_too_large")
        if end > 0 and buffered.count(b"\n", 0, end) > MAX_HEADERS:  # the request line too
            self._fail(431, "http_too_many_headers")
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            self._state = State.ERROR
            status = exc.error_status_hint
            if status == 431 or "exceeds" in str(exc) or "too long" in str(exc):
                self.status = 431
                raise ProtocolError("http_head_too_large", response(431)) from None
            if parser.trailing_data[1]:  # it closed inside its head: nobody to answer
                raise ProtocolError("client_closed_mid_head") from None
            self.status = 400
            raise ProtocolError("http_bad_request", response(400)) from None
        if event is h11.NEED_DATA:
            return NEED_DATA
        if isinstance(event, h11.ConnectionClosed):
            self._state = State.CLOSED
            return ConnectionClosed()
        if not isinstance(event, h11.Request):
            self._fail(400, "http_bad_request")
        if len(event.headers) > MAX_HEADERS:  # heads with bare LF line ends, too
            self._fail(431, "http_too_many_headers")
        self._request = self._parse_target(event)
        self._credentials = self._basic(event.headers)
        self._state = State.SEND_METHOD
        return Greeting(_WITH_CREDENTIALS if self._credentials else _NO_CREDENTIALS)

    def _fail(self, status: int, reason: str) -> NoReturn:
        self._state = State.ERROR
        self.status = status
        raise ProtocolError(reason, response(status))

    def _parse_target(self, request: h11.Request) -> CommandRequest:
        """CONNECT's authority form, or an absolute-form http:// URL (whose head is
        rewritten for the origin); 400 for anything else."""
        if request.method == b"CONNECT":
            host, port = _authority(request.target.decode("ascii", "replace"))
            if host is None:
                self._fail(400, "http_bad_target")
            return CommandRequest(Command.CONNECT, _address_type(host), host, port)
        try:
            url = urlsplit(request.target.decode("ascii", "replace"))
            ok = url.scheme.lower() == "http" and bool(url.hostname)
        except ValueError:  # e.g. "http://[::1/": an unbalanced bracket
            self._fail(400, "http_bad_target")
        if not ok:
            self._fail(400, "http_not_absolute_http_url")
        authority = url.netloc.rpartition("@")[2]
        host, port = _authority(authority, default_port=80)
        if host is None:
            self._fail(400, "http_bad_target")
        framing = {name for name, _ in request.headers if name in _FRAMING}
        if len(framing) > 1:
            # RFC 9112 section 6.1: both framings in one request is how requests are
            # smuggled past a proxy; a server may refuse it, and so do we.
            self._fail(400, "http_conflicting_framing")
        self.origin = _origin_request(request, authority, url)
        return CommandRequest(Command.CONNECT, _address_type(host), host, port)

    @staticmethod
    def _basic(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes, bytes] | None:
        for name, value in headers:
            if name == b"proxy-authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"basic":
                    return None
                try:
                    decoded = binascii.a2b_base64(token.strip(), strict_mode=True)
                except (binascii.Error, ValueError):
                    return None
                user, sep, password = decoded.partition(b":")
                return (
                    (user, password)
                    if sep and 0 < len(user) < 256 and len(password) < 256
                    else None
                )
        return None

    def send(self, message: ServerMessage) -> bytes:
        state = self._state
        kind = type(message)
        if kind is MethodSelection and state is State.SEND_METHOD:
            method = message.method  # type: ignore[union-attr]
            if method == Method.NO_ACCEPTABLE:
                return self._close(407, _AUTH_REQUIRED)
            self._state = State.AUTH if method == Method.USERNAME_PASSWORD else State.REQUEST
            return b""
        if kind is AuthStatus and state is State.SEND_AUTH_STATUS:
            if not message.ok:  # type: ignore[union-attr]
                return self._close(407, _AUTH_REQUIRED)
            self._state = State.REQUEST
            return b""
        if kind is CommandReply and state is State.SEND_REPLY:
            status = STATUS_OF_REPLY.get(message.reply, 502)  # type: ignore[union-attr]
            return self._close(status, response(status))
        raise LocalProtocolError(f"{kind.__name__} in {state.name}")

    def failure(self, reply: Reply, reason: str) -> bytes:
        """The answer to a refused request, by its reason when that says more than the
        reply code (a DNS timeout is a 504, not the 502 of its SOCKS reply)."""
        status = 504 if reason in _TIMEOUTS else STATUS_OF_REPLY.get(reply, 502)
        return self._close(status, response(status))

    def timed_out(self) -> bytes:
        """The answer to a request head not whole within the handshake timeout."""
        return self._close(408, response(408))

    def send_success(self, address: str, port: int) -> bytes:
        if self._state is not State.SEND_REPLY:
            raise LocalProtocolError(f"send_success() in {self._state.name}")
        self._state = State.RELAYING
        if self.forwards:
            return b""  # absolute form: the origin's own response is the answer
        self.status = 200
        return _ESTABLISHED

    def _close(self, status: int, wire: bytes) -> bytes:
        self._state = State.CLOSED
        self.status = status
        return wire


def _authority(text: str, default_port: int | None = None) -> tuple[str | None, int]:
    """(host, port) of "host:port" / "[v6]:port" (port optional with a default)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or "]" in port_text:
        host, port_text = text, ""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text:
        if default_port is None:
            return None, 0
        port = default_port
    elif port_text.isdigit() and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        return None, 0
    if not host or len(host) > 255 or not (_NAME.fullmatch(host) or _IPV6.fullmatch(host)):
        return None, 0
    return host, port


def _bracketed_ok(authority: str) -> bool:
    """No bracket, or "[IPv6]" / "[IPv6]:port": what urlsplit lets through."""
    if "[" not in authority and "]" not in authority:
        return True
    inside, sep, after = authority[1:].partition("]")
    if not authority.startswith("[") or not sep or "[" in inside or "]" in after:
        return False
    if after and not after.startswith(":"):
        return False
    try:
        socket.inet_pton(socket.AF_INET6, inside)
    except OSError:
        return False
    return True


def _address_type(host: str) -> AddressType:
    # Cheap tests first: ipaddress's ValueError for every name cost ~11 us a request.
    if ":" in host:
        family, kind = socket.AF_INET6, AddressType.IPV6
    elif host[-1:].isdigit():
        family, kind = socket.AF_INET, AddressType.IPV4
    else:
        return AddressType.DOMAINNAME
    try:
        socket.inet_pton(family, host)
    except OSError:
        return AddressType.DOMAINNAME
    return kind


def hop_by_hop(headers: Iterable[tuple[bytes, bytes]], framing: bool = False) -> frozenset[bytes]:
    """The (lower-case) names in `headers` meant for one hop only (RFC 9110 section
    7.6.1): the usual ones and those its Connection field names, never Host;
    `framing`: the framing ones too (a response, which h11 frames for the client)."""
    named = set(_HOP_BY_HOP)
    for name, value in headers:
        if name == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    named.discard(b"host")
    if framing:
        named.add(b"transfer-encoding")
    else:
        named -= _FRAMING
    return frozenset(named)


def _origin_request(request: h11.Request, authority: str, url: SplitResult) -> h11.Request:
    """The request the origin gets: origin form (RFC 9112 section 3.2.1), Host from
    the URL (section 3.2.2), no Proxy-* and no hop-by-hop field, the client's framing,
    and Connection: close (the origin closes first and keeps the TIME_WAIT)."""
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    drop = hop_by_hop(request.headers)
    headers = [(b"Host", authority.encode("ascii", "replace"))]
    for name, value in request.headers.raw_items():
        lower = name.lower()
        if lower in drop or lower == b"host" or lower.startswith(b"proxy-"):
            continue
        headers.append((name, value))
    headers.append((b"Connection", b"close"))
    return h11.Request(
        method=request.method, target=path.encode("ascii", "replace"), headers=headers
    )
