"""Accepting clients on the worker's listening sockets.

Owns: a bounded accept burst per readiness event, per-client socket options, the
client access rule and the overload guard (both before any byte is read), handing
each client to a new `Session`, and backing off when file descriptors run out.
Must not: read from clients.
"""

from __future__ import annotations

import errno
import socket

from socksd import policy
from socksd.handlers import ReadOnlyHandler
from workers.context import WorkerContext
from workers.events import errno_name
from workers.loop import EVENT_READ
from workers.session import Session

# Accepting in bursts keeps one busy listener from starving established tunnels.
ACCEPT_BURST = 64
# Out of fds: stop accepting this long instead of spinning on a readable listener.
FD_BACKOFF = 0.1
_FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Acceptor(ReadOnlyHandler):
    """Readiness handler of one listening socket."""

    __slots__ = ("_ctx", "sock", "_paused", "address", "_fixed_ip", "_family")

    def __init__(self, ctx: WorkerContext, sock: socket.socket, address: str) -> None:
        self._ctx = ctx
        self.sock = sock
        self.address = address
        self._paused = False
        # A listener bound to one IP only accepts clients that connected to that IP:
        # no getsockname() per client. A wildcard listener must ask each socket.
        host = sock.getsockname()[0]
        self._fixed_ip = None if host in ("0.0.0.0", "::") else policy.normalize_ip(host)
        self._family = sock.family
        ctx.loop.register(sock, EVENT_READ, self)

    def on_readable(self) -> None:
        ctx = self._ctx
        for _ in range(ACCEPT_BURST):
            try:
                # socket.accept() minus its per-call enum conversions of family and
                # type and its timeout dance (~2 us a client): the fd, then our socket,
                # of the C type (SocketType: no Python-level __init__ or close()).
                fd, peer = self.sock._accept()  # type: ignore[attr-defined]
                client = socket.SocketType(self._family, socket.SOCK_STREAM, 0, fd)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _FD_ERRNOS:
                    self._pause(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the client gave up in the accept queue: not our error
                raise
            try:
                client.setblocking(False)  # TCP_NODELAY is inherited from the listener
                # The address the client connected to: with a wildcard listener only the
                # accepted socket knows which of the host's IPs that was.
                ingress_ip = self._fixed_ip or policy.normalize_ip(client.getsockname()[0])
            except OSError:
                client.close()  # reset before we looked at it
                continue
            ctx.counters.accepted += 1
            if not ctx.clients.allows(peer[0]):
                # Before any byte is read: a denied client learns nothing about us.
                client.close()
                ctx.limits.refuse("client_denied", ctx.loop.now, "client_denied", client=peer[0])
                continue
            limit = ctx.limits.max_tunnels
            if limit and len(ctx.open) >= limit:
                client.close()  # overload: close before the greeting (no reply is owed)
                ctx.limits.refuse("overloaded", ctx.loop.now, "overloaded", open=len(ctx.open))
                continue
            Session(ctx, client, peer, ingress_ip)

    def _pause(self, exc: OSError) -> None:
        if self._paused:
            return
        self._paused = True
        self._ctx.loop.unregister(self.sock)
        # Rate-limited: under lasting exhaustion this pauses ten times a second.
        self._ctx.limits.refuse(
            "fd_exhausted",
            self._ctx.loop.now,
            "accept_paused",
            listen=self.address,
            errno=errno_name(exc.errno),
            backoff_s=FD_BACKOFF,
        )
        self._ctx.loop.call_later(FD_BACKOFF, self._resume)

    def _resume(self) -> None:
        if self._paused and self.sock.fileno() >= 0:
            self._paused = False
            self._ctx.loop.register(self.sock, EVENT_READ, self)

    def on_crash(self, exc: BaseException) -> None:
        self._ctx.log.error("accept_failed", listen=self.address, exc_info=exc)

    def close(self) -> None:
        if not self._paused:
            self._ctx.loop.unregister(self.sock)
        self._paused = True
        self.sock.close()
