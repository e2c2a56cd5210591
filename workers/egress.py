"""Upstream sockets: the only place a worker creates a connection to a target.

Owns: socket creation, `IP_BIND_ADDRESS_NO_PORT` + `bind((source_ip, 0))`, the
non-blocking connect and its completion, errno -> SOCKS reply, abortive close.
Must not: decide policy (which source, which target); `socksd.policy` does.

Why NO_PORT: a plain `bind((ip, 0))` makes the kernel pick a port that is free on that
IP for *every* destination, so one IP carries at most one ephemeral range of tunnels
in total. With IP_BIND_ADDRESS_NO_PORT the port is picked at `connect()` against the
full 4-tuple, so the range is available once per (source IP, target ip:port)
(shared/notes/port-binding.md, measured on Linux 6.18).
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any, Protocol

from socksd.socks5 import Reply
from workers.loop import EVENT_WRITE, Loop

# One table, errno -> reply (RFC 1928 section 6). Port exhaustion and a missing source
# address are "general failure": no reply code says "I ran out of ports".
_ERRNO_REPLY: dict[int, Reply] = {
    errno.ECONNREFUSED: Reply.CONNECTION_REFUSED,
    errno.ECONNRESET: Reply.CONNECTION_REFUSED,
    errno.ENETUNREACH: Reply.NETWORK_UNREACHABLE,
    errno.ENETDOWN: Reply.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: Reply.HOST_UNREACHABLE,
    errno.EHOSTDOWN: Reply.HOST_UNREACHABLE,
    errno.ETIMEDOUT: Reply.TTL_EXPIRED,
    errno.EADDRNOTAVAIL: Reply.GENERAL_FAILURE,
    errno.EADDRINUSE: Reply.GENERAL_FAILURE,
}

# Errnos that mean "this source address has no free (port, 4-tuple)" or "this source
# address is not ours": socksd's own problem, logged as its own event.
ADDRESS_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.EADDRINUSE})

_LINGER_ABORT = struct.pack("ii", 1, 0)


def reply_for_errno(err: int) -> Reply:
    """The SOCKS reply for a failed upstream connect."""
    return _ERRNO_REPLY.get(err, Reply.GENERAL_FAILURE)


class EgressFailed(Exception):
    """An upstream connect attempt failed at `stage` ("socket", "bind" or "connect")."""

    def __init__(self, stage: str, err: int) -> None:
        super().__init__(stage, err)
        self.stage = stage
        self.errno = err

    @property
    def reply(self) -> Reply:
        return reply_for_errno(self.errno)

    @property
    def reason(self) -> str:
        return errno.errorcode.get(self.errno, str(self.errno)).lower()


class ConnectOwner(Protocol):
    """Who is told how a connect attempt ended (a session)."""

    def on_egress_connected(self, sock: socket.socket) -> None: ...
    def on_egress_failed(self, failure: EgressFailed) -> None: ...
    def on_crash(self, exc: BaseException) -> None: ...


def abort(sock: socket.socket) -> None:
    """Close with SO_LINGER {1, 0}: an RST, no TIME_WAIT left holding the 4-tuple."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    except OSError:
        pass  # already reset by the peer; close() below still frees it
    sock.close()


class Connector:
    """One non-blocking connect in flight; the loop calls `on_writable` when it ends."""

    __slots__ = ("sock", "source", "target", "_loop", "_owner")

    def __init__(
        self,
        loop: Loop,
        sock: socket.socket,
        source: str,
        target: tuple[Any, ...],
        owner: ConnectOwner,
    ) -> None:
        self.sock = sock
        self.source = source
        self.target = target
        self._loop = loop
        self._owner = owner
        loop.register(sock, EVENT_WRITE, self)

    def on_writable(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._loop.unregister(self.sock)
        if err:
            abort(self.sock)
            self._owner.on_egress_failed(EgressFailed("connect", err))
        else:
            self._owner.on_egress_connected(self.sock)

    def on_readable(self) -> None:  # pragma: no cover - registered for write only
        raise AssertionError("connector registered for read")

    def on_crash(self, exc: BaseException) -> None:
        self.cancel()
        self._owner.on_crash(exc)

    def cancel(self) -> None:
        """Give up (timeout, client gone): unregister and abort the socket."""
        if self.sock.fileno() < 0:
            return
        try:
            self._loop.unregister(self.sock)
        except KeyError:
            pass  # on_writable already unregistered it
        abort(self.sock)


def connect(
    loop: Loop,
    source_ip: str,
    family: socket.AddressFamily,
    target: tuple[Any, ...],
    owner: ConnectOwner,
) -> Connector:
    """Start a connect from `source_ip` to `target`.

    The owner hears the outcome through `on_egress_connected`/`on_egress_failed`,
    always later, from the loop.

    Raises:
        EgressFailed: the attempt failed before any packet (bind error, or an immediate
            connect error such as EADDRNOTAVAIL when no 4-tuple is free).
    """
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise EgressFailed("socket", exc.errno or errno.EIO) from None
    stage = "socket"
    try:
        sock.setblocking(False)
        # Port chosen at connect() against the 4-tuple; see the module docstring.
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stage = "bind"
        sock.bind((source_ip, 0))
        stage = "connect"
        err = sock.connect_ex(target)
    except OSError as exc:
        abort(sock)
        raise EgressFailed(stage, exc.errno or errno.EIO) from None
    if err not in (0, errno.EINPROGRESS):
        abort(sock)
        raise EgressFailed("connect", err)
    return Connector(loop, sock, source_ip, target, owner)
