"""A forwarded HTTP request (absolute form) and its response, on the worker's loop.

Owns: moving one `socksd.forwarding.Exchange`'s bytes between the client and the
origin with back-pressure, the exchange's books and `tunnel_closed` line (its
`http_status` is the origin's), and what the client's connection does next: its next
request (`next_request`, a new session) when both messages ended cleanly, or a close
that lets the client read the last response first.
Must not: parse HTTP (the exchange does), decide policy or create sockets (the
session did both for this request, and does them again for the next one).

Bytes go through user space (h11 frames them); back-pressure: a side owed more than
`_OWED_MAX` bytes stops its source being read. Every request has its own upstream:
the request says `Connection: close`, so the origin closes first and keeps the
TIME_WAIT, not the egress IP's ports.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11

from socksd.forwarding import Exchange, ExchangeFailed
from socksd.http import FastRequest
from socksd.revocation import Admitted, Grant, handed_over
from workers.accounting import Moved, Recorded, record_due
from workers.egress import abort
from workers.events import errno_name
from workers.limits import Claim
from workers.loop import EVENT_READ, EVENT_WRITE, Timer
from workers.pressure import TargetCounters
from workers.relay import settle

if TYPE_CHECKING:
    from workers.context import WorkerContext

_OWED_MAX = 256 * 1024
_RECV = 64 * 1024
# After its request: what a client may send ahead (pipelined requests) while it waits;
# reading on is how a client that leaves is noticed.
_AHEAD_MAX = 64 * 1024
# After the last response of a connection that closes: how long the client has to read
# it and close before we do (closing with its unread input in our buffer would reset
# the connection over the response).
LINGER = 2.0


class _End:
    """One socket of the exchange and the bytes owed to it."""

    __slots__ = ("forward", "sock", "fd", "mask", "owed", "sent")

    def __init__(self, forward: Forward, sock: socket.SocketType, fd: int, mask: int) -> None:
        self.forward = forward
        self.sock = sock
        self.fd = fd
        self.mask = mask
        self.owed = b""
        self.sent = 0

    def on_readable(self) -> None:
        self.forward.readable(self)

    def on_writable(self) -> None:
        self.forward.flush(self)

    def on_crash(self, exc: BaseException) -> None:
        self.forward.crash(exc)


class Forward:
    """One absolute-form request, from the origin's connect to the response's end."""

    __slots__ = (
        "_ctx",
        "_loop",
        "client",
        "upstream",
        "_exchange",
        "_log",
        "started",
        "_last",
        "_lease",
        "_claim",
        "admitted",
        "recorded",
        "closed",
        "_next_request",
        "_linger",
        "_fin",
        "_upstream_open",
    )
    udp = False  # a TCP tunnel in the books

    def __init__(
        self,
        ctx: WorkerContext,
        client: tuple[socket.SocketType, int, int],
        upstream: tuple[socket.SocketType, int],
        parser: h11.Connection | None,
        request: h11.Request | FastRequest,
        ahead: bytes,
        to_client: bytes,
        log: Any,
        started: float,
        lease: TargetCounters | None,
        claim: Claim | None,
        admitted: Admitted,
        next_request: Callable[[h11.Connection | None, bytes], None],
    ) -> None:
        """Take over the client (socket, fd, loop mask) with its h11 connection past
        the request head (None: the fast path read it; `ahead`: what followed it), and
        the connected upstream
        (socket, loop mask); send the request; `next_request` gets the client's
        connection (its h11 connection, or what it sent ahead) when it can carry one."""
        self._ctx = ctx
        self._loop = ctx.loop
        self._exchange = Exchange(parser, request, ahead)
        self._log = log
        self.started = started
        self._last = ctx.loop.now
        self._lease = lease
        self._claim = claim
        self.admitted = admitted
        self.recorded: Recorded | None = None
        self.closed = False
        self._next_request = next_request
        self._linger: Timer | None = None  # set once the client's connection closes
        self._fin = False  # FIN sent to the client
        self._upstream_open = True
        c = self.client = _End(self, *client)
        u = self.upstream = _End(self, upstream[0], upstream[0].fileno(), upstream[1])
        for end in (c, u):
            if end.mask:
                self._loop.hand_over(end.fd, end)
        ctx.open.add(self)
        ctx.counters.open_tunnels += 1
        try:
            to_origin = self._exchange.start()
        except ExchangeFailed as failed:
            self._failed(failed)
            return
        if self._send(c, to_client) and self._send(u, to_origin):
            self._update()

    # -- data movement --------------------------------------------------------------

    def readable(self, end: _End) -> None:
        try:
            data = end.sock.recv(_RECV)
        except BlockingIOError:
            return
        except OSError as exc:
            self._abort(end, exc)
            return
        self._last = self._loop.now
        if self._linger is not None:  # the client's input after the last response
            if not data:
                self._end_client()
            return
        exchange = self._exchange
        try:
            if end is self.client:
                if exchange.request_done:
                    # Pipelined requests (kept for later), or the client left: like
                    # squid's default, a client that closes before its answer is gone.
                    if not data:
                        self.close("client_closed", abortive=True)
                        return
                    exchange.from_client(data)
                    self._update()
                    return
                sent = self._send(self.upstream, exchange.from_client(data))
            else:
                exchange.close_after = self._ctx.draining
                sent = self._send(self.client, exchange.from_origin(data))
        except ExchangeFailed as failed:
            self._failed(failed)
            return
        if sent:
            self._progress()

    def flush(self, end: _End) -> None:
        if self._send(end, b""):
            self._progress()

    def _send(self, end: _End, data: bytes) -> bool:
        """Send what `end` is owed, and `data`; False when the exchange was aborted."""
        data = end.owed + data if end.owed else data
        if not data:
            return True
        try:
            sent = end.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._abort(end, exc)
            return False
        end.sent += sent
        end.owed = data[sent:]
        self._last = self._loop.now
        return True

    def _progress(self) -> None:
        """After any move: the response is out whole, or the interests follow."""
        if self.closed:
            self._closing()
            return
        if self._exchange.response_done:
            # The origin has said all: its connection goes now (the rest of a request
            # body it answered early is not sent).
            self._close_upstream(abortive=False)
            if not self.client.owed:
                self._responded()
                return
        self._update()

    def _update(self) -> None:
        c, u = self.client, self.upstream
        exchange = self._exchange
        if self._linger is not None:
            want = EVENT_WRITE if c.owed else EVENT_READ
            c.mask = self._loop.set_interest(c.fd, c.mask, want, c)
            return
        want = EVENT_WRITE if c.owed else 0
        if exchange.response_done:
            pass  # the response is being flushed: what the client sends now is not read
        elif not exchange.request_done:
            if len(u.owed) < _OWED_MAX:
                want |= EVENT_READ
        elif exchange.ahead < _AHEAD_MAX:
            want |= EVENT_READ
        c.mask = self._loop.set_interest(c.fd, c.mask, want, c)
        if self._upstream_open:
            want = EVENT_WRITE if u.owed else 0
            if not exchange.response_done and len(c.owed) < _OWED_MAX:
                want |= EVENT_READ
            u.mask = self._loop.set_interest(u.fd, u.mask, want, u)

    # -- endings --------------------------------------------------------------------

    def _responded(self) -> None:
        """The whole response reached the client: this request's line, then the
        client's next request, or its connection closes."""
        exchange = self._exchange
        self._settle("done")
        if exchange.reusable and not self._ctx.draining:
            c = self.client
            c.mask = self._loop.set_interest(c.fd, c.mask, 0, c)
            self._next_request(*exchange.next_cycle())
            self._drop()
            return
        self._closing()

    def _failed(self, failed: ExchangeFailed) -> None:
        """The exchange cannot go on: a 502 (or 400) if no response head went out yet,
        otherwise both connections are reset."""
        if not failed.answer:
            self.close(failed.reason, abortive=True)
            return
        self._close_upstream(abortive=True)
        self._exchange.status = failed.status  # the client's answer is ours
        self._settle(failed.reason)
        if self._send(self.client, failed.answer):
            self._closing()

    def _abort(self, end: _End, exc: BaseException) -> None:
        if self.closed:  # its line is logged: only the client's connection is left
            self._end_client(abortive=True)
            return
        who = "client" if end is self.client else "upstream"
        self.close(f"{who}_{errno_name(getattr(exc, 'errno', 0))}", abortive=True)

    def _closing(self) -> None:
        """The client's connection ends: FIN once it has what it is owed, then its
        input is read and dropped until it closes (or LINGER passes)."""
        c = self.client
        if self._linger is None:
            self._linger = self._loop.call_later(LINGER, self._end_client)
        if not c.owed and not self._fin:
            self._fin = True
            try:
                c.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._end_client()
                return
        self._update()

    def _end_client(self, abortive: bool = False) -> None:
        c = self.client
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if c.mask:
            self._loop.forget(c.fd)  # closed on the next line
            c.mask = 0
        if abortive:
            abort(c.sock)
        else:
            c.sock.close()
        self._drop()

    def _close_upstream(self, abortive: bool) -> None:
        if not self._upstream_open:
            return
        self._upstream_open = False
        u = self.upstream
        time_wait = False
        if not abortive:
            # The origin was asked to close: if its FIN is in, it closed first and keeps
            # the TIME_WAIT; otherwise our close() does (the lease's recent closes).
            try:
                time_wait = u.sock.recv(1, socket.MSG_PEEK) != b""
            except OSError:
                time_wait = True
        if u.mask:
            self._loop.forget(u.fd)
            u.mask = 0
        if abortive:
            abort(u.sock)
        else:
            u.sock.close()
        if self._lease is not None:
            self._lease.release(self._loop.now, time_wait)
            self._lease = None

    def _settle(self, reason: str) -> None:
        self.closed = True
        claim, self._claim = self._claim, None
        settle(self._ctx, self, self._log, reason, None, claim, self._exchange.status)

    def _drop(self) -> None:
        """Nothing of this exchange is left: break the cycles (freed by refcounting)."""
        del self.client.forward, self.upstream.forward

    def close(self, reason: str, abortive: bool = False) -> None:
        """End now (kicked, revoked, idle, worker stopping): both connections, reset
        when `abortive`, and the request's line."""
        if self.closed:
            if self._linger is not None:  # closing the client's connection
                self._end_client(abortive)
            return
        self._close_upstream(abortive)
        self._settle(reason)
        self._end_client(abortive)

    # -- what the worker asks of an open connection ------------------------------------

    def quiet_since(self) -> float:
        """Loop time of the last byte moved either way (the idle sweep reads it)."""
        return self._last

    def moved(self) -> Moved:
        """Bytes delivered so far: to the origin (up, the request as re-framed), to the
        client (down, the response as re-framed)."""
        return self.upstream.sent, self.client.sent, 0, 0

    def record_usage(self) -> None:
        """A due `tunnel_usage` line (the accounting sweep calls it)."""
        ledger = self._ctx.ledger
        assert ledger is not None
        record_due(ledger, self, self._log, self._loop.now)

    def describe(self) -> tuple[Any, str, float, int, int]:
        """For `socksd tunnels`, as a relay's."""
        return self._log, "tcp", self.started, self.upstream.sent, self.client.sent

    def granted(self) -> Grant:
        return handed_over(self.admitted)

    def revoke(self, by: str) -> None:
        self._log = self._log.bind(revoked_by=by)
        self.close("revoked", abortive=True)

    def crash(self, exc: BaseException) -> None:
        self._log.error("tunnel_crashed", exc_info=exc)
        self.close("crashed", abortive=True)
