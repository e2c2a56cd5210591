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
"""

from __future__ import annotations

from typing import Final

import h11

from socksd.http import hop_by_hop, response

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


class Exchange:
    """The client's h11 connection (the request head read, its body maybe not) and one
    to the origin; bytes in, bytes out."""

    __slots__ = ("_client", "_origin", "status", "request_done", "response_done", "close_after")

    def __init__(self, client: h11.Connection) -> None:
        self._client = client
        self._origin = h11.Connection(h11.CLIENT, max_incomplete_event_size=RESPONSE_HEAD_MAX)
        self.status = 0  # the origin's final status, once its head came (the line's)
        self.request_done = False
        self.response_done = False
        # Set before the response head: it then says "Connection: close" (a draining
        # worker takes no next request).
        self.close_after = False

    def start(self, request: h11.Request) -> bytes:
        """The request for the origin (`socksd.http` made it), and as much of its body
        as the client sent with its head."""
        return self._origin.send(request) + self._request_body()

    def from_client(self, data: bytes) -> bytes:
        """More of the client's request body (b"": the client closed); what goes to the
        origin.

        Raises:
            ExchangeFailed: the client closed inside its body, or framed it wrong.
        """
        self._client.receive_data(data)
        return self._request_body(eof=not data)

    def _request_body(self, eof: bool = False) -> bytes:
        client, origin = self._client, self._origin
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
        origin = self._origin
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

    @property
    def ahead(self) -> int:
        """Bytes the client sent past this request (its next ones), kept for later."""
        return len(self._client.trailing_data[0])

    @property
    def reusable(self) -> bool:
        """Both messages are whole and neither side asked to close: the client's
        connection can carry its next request."""
        client = self._client
        return client.our_state is _DONE and client.their_state is _DONE

    def next_cycle(self) -> h11.Connection:
        """The client's connection, ready for its next request (what it sent after
        this one stays buffered in it)."""
        self._client.start_next_cycle()
        return self._client
