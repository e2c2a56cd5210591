"""The byte pump between a client and its target, once the tunnel is up.

Owns: reading and writing both sockets, back-pressure, half-close, byte counters,
closing both sockets and the tunnel's `tunnel_closed` line (its idle cut is
`workers.sweeps`').
Must not: know SOCKS; the session hands over two connected sockets, the bytes still
owed to each side (the reply, the client's early payload) and a bound logger.

Memory: reads go into one buffer shared by the whole worker; a tunnel holds bytes only
when a send was partial, at most one read (`buffer` size) per direction, and stops
reading the source until they are flushed. An idle tunnel owns no buffer at all.

Bulk flows go zero-copy: once a read fills the whole shared buffer, that direction
switches to splice(2) through a pipe borrowed from the worker's pool (socket -> pipe
-> socket, no byte enters Python). The pipe is given back as soon as it is empty, so
only tunnels with bytes in flight hold one. Small exchanges (a request, a reply) stay
on recv_into/send, which costs the same two syscalls without touching the pool.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import TYPE_CHECKING, Any

from socksd.revocation import Admitted, Grant, handed_over
from workers.accounting import Moved, Recorded, record_due
from workers.egress import abort
from workers.events import errno_name, tunnel_closed
from workers.limits import Claim
from workers.loop import EVENT_READ, EVENT_WRITE
from workers.pipes import PIPE_SIZE, Pipe
from workers.pipes import close as close_pipe
from workers.pressure import TargetCounters

if TYPE_CHECKING:
    from workers.context import WorkerContext

# Any socket error but EAGAIN ends the tunnel (ECONNRESET, EPIPE, ETIMEDOUT, and the
# EHOSTUNREACH a dead peer's retransmissions end with): an abort, not a crash.
_DISCONNECTS = (OSError,)
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class _Side:
    """One socket of a tunnel and the bytes owed to it."""

    __slots__ = (
        "sock",
        "fd",
        "relay",
        "peer",
        "pending",
        "eof",
        "wr_closed",
        "mask",
        "sent",
        "pipe",
        "piped",
        "bulk",
    )

    def __init__(self, sock: socket.SocketType, fd: int, relay: Relay, mask: int) -> None:
        self.sock = sock
        self.fd = fd
        self.relay = relay
        self.peer: _Side = self
        self.mask = mask  # events currently registered
        self.pending = b""  # bytes owed to this socket
        # eof: this socket sent FIN, nothing more to read from it; wr_closed: we sent
        # FIN to it; bulk: reads from it go through splice.
        self.eof = self.wr_closed = self.bulk = False
        self.sent = self.piped = 0  # bytes written to it; bytes owed to it in `pipe`
        self.pipe: Pipe | None = None  # borrowed while bytes owed to this socket sit in it

    def owed(self) -> bool:
        return bool(self.pending) or self.piped > 0

    def on_readable(self) -> None:
        """Readable: move one read's worth of bytes to the peer.

        The common case (a read that the peer takes whole) runs here without further
        calls: it is ~4 of a short tunnel's ~10 loop events."""
        relay = self.relay
        if self.bulk:
            relay._splice_in(self)
            return
        try:
            n = self.sock.recv_into(relay._view, relay._size)
        except BlockingIOError:
            return
        except _DISCONNECTS as exc:
            relay._abort(self, exc)
            return
        relay._last = relay._loop.now
        if n == 0:
            relay._eof(self)
            return
        if n == relay._size and relay._pipes is not None:
            self.bulk = True  # a full buffer: a bulk flow, kernel to kernel from now on
        dst = self.peer
        try:
            sent = dst.sock.send(relay._view[:n])
        except BlockingIOError:
            sent = 0
        except _DISCONNECTS as exc:
            relay._abort(dst, exc)
            return
        dst.sent += sent
        if sent < n:
            # Back-pressure: keep the rest, stop reading here until dst drains it.
            dst.pending = bytes(relay._view[sent:n])
            relay._update(self)
            relay._update(dst)

    def on_writable(self) -> None:
        self.relay.flush(self)

    def on_crash(self, exc: BaseException) -> None:
        self.relay.crash(exc)


class Relay:
    """Bidirectional non-blocking relay with back-pressure and half-close."""

    __slots__ = (
        "_ctx",
        "_loop",
        "_view",
        "_size",
        "_pipes",
        "client",
        "upstream",
        "_log",
        "_last",
        "closed",
        "_reply_len",
        "_lease",
        "_target_closed_first",
        "_claim",
        "admitted",
        "started",
        "recorded",
    )
    udp = False  # a TCP tunnel (the books count bytes and associations apart)

    def __init__(
        self,
        ctx: WorkerContext,
        client: socket.SocketType,
        client_fd: int,
        upstream: socket.SocketType,
        to_client: bytes,
        to_upstream: bytes,
        log: Any,
        started: float,
        lease: TargetCounters | None,
        claim: Claim | None,
        client_mask: int,
        upstream_mask: int,
        admitted: Admitted,
    ) -> None:
        """Take over two connected sockets, with their loop registrations (masks, 0:
        none), the bytes owed to each, the tunnel's bound logger and what it was
        admitted on (re-checked by a reload)."""
        self._ctx = ctx
        self.admitted = admitted
        self.recorded: Recorded | None = None  # its last tunnel_usage record
        loop = self._loop = ctx.loop
        self._view = ctx.buffer
        self._size = len(ctx.buffer)
        self._pipes = ctx.pipes  # None: splice off
        self._log = log
        self.started = started
        self._last = loop.now
        self._lease = lease
        self._claim = claim
        self._reply_len = len(to_client)  # the SOCKS reply is not tunnel payload
        self.closed = False
        # Who sent the first FIN on the upstream connection decides who keeps its
        # 4-tuple in TIME_WAIT: if we did, that quad is not reusable for a while.
        self._target_closed_first = False
        c = self.client = _Side(client, client_fd, self, client_mask)
        u = self.upstream = _Side(upstream, upstream.fileno(), self, upstream_mask)
        c.peer = u
        u.peer = c
        # The session's and the connector's registrations: a dict update each.
        if client_mask:
            loop.hand_over(client_fd, c)
        if upstream_mask:
            loop.hand_over(u.fd, u)
        ctx.open.add(self)
        ctx.counters.open_tunnels += 1
        # The SOCKS reply and the client's early payload: usually sent whole at once;
        # whatever is left waits for EVENT_WRITE like any partial send.
        sent = self._send(c, to_client)
        if sent is None:
            return  # aborted
        if sent < len(to_client):
            c.pending = to_client[sent:]
        if to_upstream:
            sent = self._send(u, to_upstream)
            if sent is None:
                return
            u.pending = to_upstream[sent:]
        if c.pending or u.pending or client_mask != EVENT_READ:
            self._update(c)
            self._update(u)
        else:  # the usual start: the client is read already, the upstream now is too
            u.mask = loop.set_interest(u.fd, upstream_mask, EVENT_READ, u)

    # -- data movement --------------------------------------------------------------

    def _eof(self, src: _Side) -> None:
        src.eof = True
        if src is self.upstream and not src.wr_closed:
            self._target_closed_first = True
        peer = src.peer
        if not (peer.pending or peer.piped):
            if peer.eof:
                # Both directions are done: close() sends the FIN itself, so skip the
                # shutdown() syscall (nothing unread is left, so close is graceful).
                peer.wr_closed = True
                self.close("eof")
                return
            self._shutdown_write(peer)
        # Stop reading src. Nothing that decides the peer's interest changed, and
        # both directions done was handled above (or, with bytes owed, by flush()).
        self._update(src)

    def _splice_in(self, src: _Side) -> None:
        """Bulk mode: socket -> pipe -> peer socket, no bytes in Python."""
        dst = src.peer
        assert self._pipes is not None
        pipe = dst.pipe or self._pipes.borrow()
        if pipe is None:
            src.bulk = False  # no pipe to be had: copy through user space instead
            src.on_readable()
            return
        try:
            n = os.splice(src.fd, pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
        except OSError as exc:
            if dst.pipe is None:
                self._pipes.give_back(pipe)  # still empty
            if not isinstance(exc, BlockingIOError):
                self._abort(src, exc)
            return
        self._last = self._loop.now
        if n == 0:
            if dst.pipe is None:
                self._pipes.give_back(pipe)
            self._eof(src)
            return
        dst.pipe = pipe
        dst.piped += n
        if self._splice_out(dst) and dst.piped:
            self._update(src)  # back-pressure: the pipe holds what dst cannot take yet
            self._update(dst)

    def _splice_out(self, dst: _Side) -> bool:
        """Move piped bytes to `dst`; False when the tunnel was aborted."""
        assert dst.pipe is not None and self._pipes is not None
        try:
            m = os.splice(dst.pipe[0], dst.fd, dst.piped, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            m = 0
        except OSError as exc:
            self._abort(dst, exc)
            return False
        dst.piped -= m
        dst.sent += m
        if not dst.piped:
            self._pipes.give_back(dst.pipe)
            dst.pipe = None
        return True

    def _send(self, dst: _Side, data: bytes | memoryview) -> int | None:
        """Bytes sent to `dst` (0 when it is full); None when the tunnel was aborted."""
        try:
            sent = dst.sock.send(data)
        except BlockingIOError:
            return 0
        except _DISCONNECTS as exc:
            self._abort(dst, exc)
            return None
        dst.sent += sent
        return sent

    def flush(self, dst: _Side) -> None:
        """`dst` is writable: send what is owed to it."""
        if dst.pending:
            sent = self._send(dst, dst.pending)
            if sent is None:
                return
            dst.pending = dst.pending[sent:]
        if not dst.pending and dst.piped and not self._splice_out(dst):
            return
        self._last = self._loop.now
        if dst.owed():
            self._update(dst)
            return
        if dst.peer.eof:
            self._shutdown_write(dst)
        self._after_change(dst.peer)

    def _shutdown_write(self, side: _Side) -> None:
        side.wr_closed = True
        try:
            side.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise

    def _after_change(self, src: _Side) -> None:
        if self._finished():
            self.close("eof")
            return
        self._update(src)
        self._update(src.peer)

    def _finished(self) -> bool:
        c, u = self.client, self.upstream
        return c.eof and u.eof and c.wr_closed and u.wr_closed

    def _update(self, side: _Side) -> None:
        """Register exactly the events this side needs now."""
        peer = side.peer
        # owed() spelled out: this runs several times per tunnel.
        want = 0
        if not side.eof and not (peer.pending or peer.piped) and not peer.wr_closed:
            want = EVENT_READ
        if side.pending or side.piped:
            want |= EVENT_WRITE
        if want != side.mask:
            side.mask = self._loop.set_interest(side.fd, side.mask, want, side)

    # -- endings --------------------------------------------------------------------

    def quiet_since(self) -> float:
        """Loop time of the last byte moved either way (the idle sweep reads it)."""
        return self._last

    def _abort(self, side: _Side, exc: BaseException) -> None:
        who = "client" if side is self.client else "upstream"
        self.close(f"{who}_{errno_name(getattr(exc, 'errno', 0))}", abortive=True)

    def moved(self) -> Moved:
        """Bytes delivered so far: to the target (up), to the client (down, the SOCKS
        reply left out); no datagrams."""
        down = self.client.sent - self._reply_len
        return self.upstream.sent, down if down > 0 else 0, 0, 0

    def record_usage(self) -> None:
        """A due `tunnel_usage` line (the accounting sweep calls it)."""
        ledger = self._ctx.ledger
        assert ledger is not None
        record_due(ledger, self, self._log, self._loop.now)

    def describe(self) -> tuple[Any, str, float, int, int]:
        """For `socksd tunnels`: the bound logger (its context: conn_id, client, user,
        target, egress, ...), the kind, the loop time it started, the bytes each way."""
        moved = self.moved()
        return self._log, "tcp", self.started, moved[0], moved[1]

    def granted(self) -> Grant:
        """What the tunnel was admitted on (a reload re-checks it)."""
        return handed_over(self.admitted)

    def revoke(self, by: str) -> None:
        """A reload's new config refuses this tunnel: reset both sides now (the client
        must not mistake the cut for the end of the stream); `by` says why."""
        self._log = self._log.bind(revoked_by=by)
        self.close("revoked", abortive=True)

    def crash(self, exc: BaseException) -> None:
        self._log.error("tunnel_crashed", exc_info=exc)
        self.close("crashed", abortive=True)

    def close(self, reason: str, abortive: bool = False) -> None:
        """Close both sockets and log the tunnel's one `tunnel_closed` line.

        An abortive close resets both sides so neither mistakes a cut tunnel for a
        complete stream.
        """
        if self.closed:
            return
        self.closed = True
        loop = self._loop
        c, u = self.client, self.upstream
        for side in (c, u):
            if side.mask:
                loop.forget(side.fd)  # closed on the next line
                side.mask = 0
            if abortive:
                abort(side.sock)
            else:
                side.sock.close()
            if side.pipe is not None:
                # Bytes still in the pipe belong to this tunnel: never lend them out.
                close_pipe(side.pipe)
                side.pipe = None
        # Break the relay <-> side cycles: freed by refcounting now, not left to the
        # cyclic GC (whose young collections cost ~3 % of a busy worker's CPU).
        del c.relay, c.peer, u.relay, u.peer
        time_wait = not abortive and not self._target_closed_first
        settle(self._ctx, self, self._log, reason, self._lease, self._claim, None, time_wait)


def settle(
    ctx: WorkerContext,
    tunnel: Any,
    log: Any,
    reason: str,
    lease: TargetCounters | None,
    claim: Claim | None,
    http_status: int | None = None,
    time_wait: bool = False,
) -> None:
    """The books of a TCP tunnel (a relay, a forwarded HTTP request) whose sockets just
    closed: the worker's counters, its user's and ingress IP's accounts, its one
    `tunnel_closed` line (with `http_status`, if any), its egress lease (`time_wait`:
    we closed first) and its place in the limits."""
    now = ctx.loop.now
    moved = tunnel.moved()
    bytes_up, bytes_down = moved[0], moved[1]
    counters = ctx.counters
    counters.open_tunnels -= 1
    counters.tunnels_closed += 1
    counters.bytes_up += bytes_up
    counters.bytes_down += bytes_down
    ledger = ctx.ledger
    unreported = None
    if ledger is not None:
        unreported = ledger.closed(tunnel.admitted, False, moved, tunnel.recorded)
    started = tunnel.started
    if http_status is None:
        tunnel_closed(log, reason, started, now, bytes_up, bytes_down, 0, unreported)
    else:
        tunnel_closed(
            log, reason, started, now, bytes_up, bytes_down, 0, unreported, http_status=http_status
        )
    ctx.open.discard(tunnel)
    if lease is not None:
        lease.release(now, time_wait)
    if claim is not None:
        claim.release()
