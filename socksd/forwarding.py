"""One forwarded HTTP request (absolute form) and its response, sans-IO.

Owns:
    ``Exchange``: the bytes of one ``GET http://host/path``-style request and its
    response between a client and the origin, with h11 on both sides: the request's
    body re-framed for the origin as the client framed it (Content-Length or chunked),
    the response's head without its hop-by-hop fields and re-framed for the client
    (chunked for an HTTP/1.1 client when the origin ends its body by closing, so the
    client's connection can stay open); 1xx answers (``100 Continue``) passed on;
    whether the client's connection can carry its next request.

Must not:
    Touch sockets, or know users, rules or egress (the session admitted the request,
    `workers.forward` moves the bytes).

Response trailers are dropped (the client's framing may not carry them); the client's
request trailers go on, its framing and the origin's being the same.

Fast path: a plain GET or HEAD that `socksd.http` read without h11 (`FastRequest`)
whose answer has one Content-Length and nothing unusual is framed here without h11
too; any other answer (chunked, ended by a close, 1xx, 204, 304, ...) hands the
exchange to h11, which reads the request and the answer as if it had from the start.
The two give the same bytes (tests/unit/test_forwarding.py). h11 cost ~155 us an
exchange (both heads, both sides), the fast path ~25 us.
"""

from __future__ import annotations

from typing import Final

import h11

from socksd.http import FIELD_VALUE, HEAD_MAX, TOKEN, FastRequest, hop_by_hop, response

# A response head may carry many cookies: 64 KiB, where a request head gets 16 KiB.
RESPONSE_HEAD_MAX: Final = 64 * 1024
_DONE = h11.DONE
_NEED_DATA = h11.NEED_DATA
_PAUSED = h11.PAUSED


class ExchangeFailed(Exception):
    """The exchange cannot go on: `reason` for the log, `status` the answer the client
    gets before its connection closes (502 or 400, when no response head was sent yet;
    0: none, the connection is reset: a cut body must not pass for a whole one)."""

    def __init__(self, reason: str, status: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.answer = response(status) if status else b""


def _origin_connection() -> h11.Connection:
    return h11.Connection(h11.CLIENT, max_incomplete_event_size=RESPONSE_HEAD_MAX)


class Exchange:
    """The client's h11 connection (the request head read, its body maybe not) and one
    to the origin, or the fast path's request; bytes in, bytes out."""

    __slots__ = (
        "_client",
        "_origin",
        "_request",
        "_fast",
        "_buf",
        "_ahead",
        "_left",
        "_said_close",
        "status",
        "request_done",
        "response_done",
        "close_after",
    )

    def __init__(
        self,
        client: h11.Connection | None,
        request: h11.Request | FastRequest,
        ahead: bytes = b"",
    ) -> None:
        """`client` None: the fast path read `request` (`socksd.http.FastRequest`) and
        the client sent `ahead` after it."""
        self._client = client
        self._request = request
        self._fast = request if type(request) is FastRequest else None
        self._origin = None if self._fast is not None else _origin_connection()
        self._buf = bytearray()  # fast path: the answer's head so far
        self._ahead = ahead  # fast path: what the client sent past its request
        self._left = -1  # fast path: body bytes still to come (-1: the head is not in)
        self._said_close = False  # fast path: the head said "Connection: close"
        self.status = 0  # the origin's final status, once its head came (the line's)
        self.request_done = False
        self.response_done = False
        # Set before the response head: it then says "Connection: close" (a draining
        # worker takes no next request).
        self.close_after = False

    def start(self) -> bytes:
        """The request for the origin (`socksd.http` made it), and as much of its body
        as the client sent with its head."""
        fast = self._fast
        if fast is not None:
            self.request_done = True  # a GET or HEAD: no body
            return fast.origin
        assert self._origin is not None and type(self._request) is h11.Request
        return (self._origin.send(self._request) or b"") + self._request_body()

    def from_client(self, data: bytes) -> bytes:
        """More of the client's request body (b"": the client closed); what goes to the
        origin.

        Raises:
            ExchangeFailed: the client closed inside its body, or framed it wrong.
        """
        if self._client is None:  # fast path: its next request, kept for later
            self._ahead += data
            return b""
        self._client.receive_data(data)
        return self._request_body(eof=not data)

    def _request_body(self, eof: bool = False) -> bytes:
        client, origin = self._client, self._origin
        assert client is not None and origin is not None
        out: list[bytes] = []
        while not self.request_done:
            try:
                event = client.next_event()
            except h11.RemoteProtocolError:
                event = None
            if event is _NEED_DATA:
                break
            if isinstance(event, (h11.Data, h11.EndOfMessage)):
                out.append(origin.send(event) or b"")
                self.request_done = type(event) is h11.EndOfMessage
                continue
            # The origin got part of a body: its connection goes. The client hears a
            # 400 if no response started (a cut body must not pass for a whole one).
            status = 0 if eof or self.status else 400
            reason = "client_closed_mid_request" if eof else "http_bad_request_body"
            raise ExchangeFailed(reason, status)
        return b"".join(out)

    def from_origin(self, data: bytes) -> bytes:
        """More of the origin's response (b"": it closed); what goes to the client.

        Raises:
            ExchangeFailed: a malformed response, or one cut short.
        """
        if self._fast is not None:
            return self._fast_answer(data)
        origin = self._origin
        assert origin is not None
        try:
            origin.receive_data(data)
        except RuntimeError:  # bytes after its EOF: cannot happen from a socket
            raise ExchangeFailed("upstream_bad_response") from None
        out: list[bytes] = []
        while not self.response_done:
            try:
                event = origin.next_event()
                if event is _NEED_DATA or event is _PAUSED:
                    break
                out.append(self._to_client(event))  # type: ignore[arg-type]
            except (h11.RemoteProtocolError, h11.LocalProtocolError):
                # Remote: a malformed or cut response. Local: one h11 cannot frame for
                # the client (e.g. more body than its Content-Length said).
                if not self.status:
                    raise ExchangeFailed("upstream_bad_response", 502) from None
                raise ExchangeFailed("upstream_cut_response") from None
        return b"".join(out)

    def _to_client(self, event: h11.Event) -> bytes:
        """One event of the origin's response, as the client gets it."""
        client = self._client
        assert client is not None
        if isinstance(event, h11.Data):
            return client.send(event) or b""
        if isinstance(event, h11.Response):
            self.status = event.status_code
            return client.send(self._head(event)) or b""
        if isinstance(event, h11.InformationalResponse):  # 100 Continue, 103 Early Hints
            if client.their_http_version == b"1.0":
                return b""  # RFC 9110 section 15.2: never to an HTTP/1.0 client
            return client.send(self._head(event)) or b""
        if isinstance(event, h11.EndOfMessage):
            self.response_done = True
            return client.send(h11.EndOfMessage()) or b""
        raise h11.RemoteProtocolError("closed before a response")  # h11 raises it first

    def _head(
        self, event: h11.Response | h11.InformationalResponse
    ) -> h11.Response | h11.InformationalResponse:
        """The origin's response head as the client gets it: the fields meant for one
        hop (and the framing, which h11 writes for the client) left out."""
        drop = hop_by_hop(event.headers, framing=True)
        if b"transfer-encoding" in (name for name, _ in event.headers):
            # RFC 9112 section 6.3: Transfer-Encoding overrides Content-Length, which
            # must not go on (h11 read the body chunked: it would frame it by the length).
            drop |= {b"content-length"}
        headers = [(n, v) for n, v in event.headers.raw_items() if n.lower() not in drop]
        if type(event) is h11.Response and (self.close_after or not self.request_done):
            # A draining worker takes no next request; nor does a connection whose
            # request body the response came before (the rest of it is dropped).
            headers.append((b"Connection", b"close"))
        return type(event)(status_code=event.status_code, headers=headers, reason=event.reason)

    # -- the fast path --------------------------------------------------------------

    def _fast_answer(self, data: bytes) -> bytes:
        if self._left >= 0:  # in the body
            if not data:
                raise ExchangeFailed("upstream_cut_response")
            take = data[: self._left]
            self._left -= len(take)
            self.response_done = not self._left
            return take
        buf = self._buf
        seen = max(0, len(buf) - 3)  # searched already (a read at a time: not quadratic)
        buf += data
        end = buf.find(b"\r\n\r\n", seen)
        if end < 0:
            # h11 also ends a head at LF LF or LF CR LF: those go to it at once.
            ended = buf.find(b"\n\n", seen) >= 0 or buf.find(b"\n\r\n", seen) >= 0
            if data and not ended and len(buf) <= RESPONSE_HEAD_MAX:
                return b""  # more of the head to come
            return self._fall_back(eof=not data)
        fast = self._fast
        assert fast is not None
        simple = _simple_head(bytes(buf[:end]), fast.method == b"HEAD")
        if simple is None:
            return self._fall_back(eof=not data)
        self.status, head, self._left = simple
        if self.close_after or not fast.keep_alive:
            head += b"\r\nConnection: close"
            self._said_close = True
        body = bytes(buf[end + 4 :])
        self._buf = bytearray()
        out = head + b"\r\n\r\n"
        if not self._left:
            self.response_done = True
            return out
        return out + self._fast_answer(body) if body else out

    def _fall_back(self, eof: bool) -> bytes:
        """An answer the fast path does not frame: h11 reads the request (again) and
        the answer so far, and takes the exchange over."""
        fast = self._fast
        assert fast is not None
        client = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_MAX)
        client.receive_data(fast.head + self._ahead)
        client.next_event()  # the Request ...
        client.next_event()  # ... and its EndOfMessage (a GET: no body)
        reader = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_MAX)
        reader.receive_data(fast.origin)
        request = reader.next_event()  # the origin's request, as h11 would have sent it
        assert type(request) is h11.Request
        origin = _origin_connection()
        origin.send(request)
        origin.send(h11.EndOfMessage())
        answer, self._buf, self._ahead = bytes(self._buf), bytearray(), b""
        self._client, self._origin, self._fast = client, origin, None
        out = self.from_origin(answer)
        if eof and not self.response_done:
            out += self.from_origin(b"")
        return out

    # -- what comes next ---------------------------------------------------------------

    @property
    def ahead(self) -> int:
        """Bytes the client sent past this request (its next ones), kept for later."""
        if self._client is None:
            return len(self._ahead)
        return len(self._client.trailing_data[0])

    @property
    def reusable(self) -> bool:
        """Both messages are whole and neither side asked to close: the client's
        connection can carry its next request."""
        client = self._client
        if client is None:
            assert self._fast is not None
            return self.response_done and self._fast.keep_alive and not self._said_close
        return client.our_state is _DONE and client.their_state is _DONE

    def next_cycle(self) -> tuple[h11.Connection | None, bytes]:
        """The client's connection, ready for its next request: its h11 connection
        (what it sent after this one buffered in it), or (fast path) None and what it
        sent ahead."""
        client = self._client
        if client is None:
            return None, self._ahead
        client.start_next_cycle()
        return client, b""


def _simple_head(head: bytes, to_head: bool) -> tuple[int, bytes, int] | None:
    """An answer's head the fast path frames, as the client gets it (the status line in
    HTTP/1.1, no hop-by-hop field) with its status and body length (0 for a HEAD
    request's); None for any other: no or several lengths, Transfer-Encoding, 1xx,
    204, 304, a field h11 would refuse."""
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        return None
    status = int(code)
    if status < 200 or status in (204, 304) or not FIELD_VALUE.fullmatch(reason):
        return None
    length = -1
    fields: list[tuple[bytes, bytes]] = []
    names: list[bytes] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not TOKEN.fullmatch(name) or not FIELD_VALUE.fullmatch(value):
            return None
        lower = name.lower()
        value = value.strip(b" \t")
        if lower == b"transfer-encoding":
            return None
        if lower == b"content-length":
            # h11 takes at most 20 digits (int() itself stops at 4,300: a ValueError)
            if length >= 0 or not value.isdigit() or len(value) > 20:
                return None
            length = int(value)
        fields.append((lower, value))
        names.append(name)
    drop = hop_by_hop(fields, framing=True)
    if length < 0 or b"content-length" in drop:
        return None  # no length, or one its Connection field names: h11 chunks the body
    out = [b"HTTP/1.1 %d %s" % (status, reason)]
    for (lower, value), name in zip(fields, names, strict=True):
        if lower not in drop:
            out.append(name + b": " + value)
    return status, b"\r\n".join(out), 0 if to_head else length
