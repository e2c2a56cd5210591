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

from socksd.codec import Reply
from socksd.handlers import WriteOnlyHandler
from workers.events import errno_name
from workers.loop import EVENT_WRITE, Loop, Timer
from workers.pressure import PortPressure, TargetCounters

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
        if self.errno == errno.EADDRNOTAVAIL:
            # bind: the source IP is not on this host; connect: no free 4-tuple.
            return "egress_ip_not_local" if self.stage == "bind" else "egress_exhausted"
        return errno_name(self.errno)


class ConnectOwner(Protocol):
    """Who is told how a connect attempt ended (a session)."""

    def on_egress_connected(self, sock: socket.SocketType, lease: TargetCounters) -> None:
        """`sock` is connected and still registered for EVENT_WRITE with the connector:
        the new owner takes the registration over (Loop.hand_over), saving two syscalls."""

    def on_egress_failed(self, failure: EgressFailed) -> None: ...
    def on_crash(self, exc: BaseException) -> None: ...


def abort(sock: socket.SocketType) -> None:
    """Close with SO_LINGER {1, 0}: an RST, no TIME_WAIT left holding the 4-tuple."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    except OSError:
        pass  # already reset by the peer; close() below still frees it
    sock.close()


class Connector(WriteOnlyHandler):
    """One upstream connect, with timer-driven retries while no 4-tuple is free.

    `connect()` builds it and makes the first attempt at once. The owner then hears
    exactly once, always from the loop: `on_egress_connected` or `on_egress_failed`.
    """

    __slots__ = (
        "sock",
        "source",
        "family",
        "target",
        "_loop",
        "_owner",
        "_pressure",
        "_tc",
        "_delays",
        "_attempts",
        "_timer",
    )

    def __init__(
        self,
        loop: Loop,
        pressure: PortPressure,
        source: str,
        family: socket.AddressFamily,
        target: tuple[Any, ...],
        owner: ConnectOwner,
        retry_delays: tuple[float, ...],
    ) -> None:
        self.sock: socket.SocketType | None = None
        self.source = source
        self.family = family
        self.target = target
        self._loop = loop
        self._owner = owner
        self._pressure = pressure
        self._tc = pressure.target(source, target[0], target[1])
        self._delays = retry_delays
        self._attempts = 0
        self._timer: Timer | None = None

    def _attempt(self) -> EgressFailed | None:
        """One socket/bind/connect; None when it is in flight or waiting for a retry."""
        ipc = self._tc.ipc
        self._attempts += 1
        try:
            # Non-blocking from birth: no ioctl(FIONBIO) afterwards. The C socket type
            # (SocketType): no Python-level __init__ or close() wrapper per tunnel.
            sock = socket.SocketType(self.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            return self._failed("socket", exc.errno or errno.EIO)
        stage = "socket"
        try:
            # Port chosen at connect() against the 4-tuple; see the module docstring.
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stage = "bind"
            sock.bind((self.source, 0))
            stage = "connect"
            ipc.attempted += 1
            err = sock.connect_ex(self.target)
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err in (0, errno.EINPROGRESS):
            self.sock = sock
            self._pressure.opened(self._tc, self._loop.now)
            self._loop.set_interest(sock.fileno(), 0, EVENT_WRITE, self)
            return None
        abort(sock)
        if stage == "connect" and err == errno.EADDRNOTAVAIL:
            # Every port is taken for this (source, target) right now. Quads held for
            # milliseconds (target closing first) free up quickly: retry by timer.
            ipc.fail(errno_name(err))
            if self._attempts <= len(self._delays):
                ipc.retries += 1
                delay = self._delays[self._attempts - 1]
                self._timer = self._loop.call_later(delay, self._retry)
                return None
            self._pressure.exhausted(self._tc, self._loop.now, self._attempts)
            return EgressFailed(stage, err)
        return self._failed(stage, err)

    def _failed(self, stage: str, err: int) -> EgressFailed:
        ipc = self._tc.ipc
        ipc.fail(errno_name(err))
        if stage == "bind":
            self._pressure.bind_failed(ipc, errno_name(err), self._loop.now)
        return EgressFailed(stage, err)

    def _retry(self) -> None:
        self._timer = None
        failure = self._attempt()
        if failure is not None:
            self._owner.on_egress_failed(failure)

    def on_writable(self) -> None:
        sock = self.sock
        assert sock is not None
        # A failed connect always comes with EPOLLERR (tcp_poll: sk_err is set), so a
        # plain EPOLLOUT means connected: no getsockopt(SO_ERROR) syscall for it.
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if self._loop.fault else 0
        self.sock = None
        ipc = self._tc.ipc
        if err:
            self._loop.forget(sock.fileno())  # aborted (closed) below
            self._tc.release(self._loop.now, time_wait=False)
            abort(sock)
            ipc.fail(errno_name(err))
            self._owner.on_egress_failed(EgressFailed("connect", err))
            return
        ipc.succeeded += 1
        if self._attempts > 1:
            ipc.rescued += 1
        try:
            self._owner.on_egress_connected(sock, self._tc)
        except BaseException:
            # The owner never took the socket over: it is still ours to unwind, or it
            # would stay registered (always writable) and hold its port forever.
            if sock.fileno() >= 0 and self._loop.handler_of(sock) is self:
                self._loop.forget(sock.fileno())  # aborted (closed) below
                self._tc.release(self._loop.now, time_wait=False)
                abort(sock)
            raise

    def on_crash(self, exc: BaseException) -> None:
        self.cancel()
        self._owner.on_crash(exc)

    def cancel(self) -> None:
        """Give up (timeout, client gone): stop retrying, abort the socket in flight."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        sock, self.sock = self.sock, None
        if sock is None:
            return
        self._loop.forget(sock.fileno())  # aborted (closed) below
        self._tc.release(self._loop.now, time_wait=False)
        abort(sock)


def connect(
    loop: Loop,
    pressure: PortPressure,
    source_ip: str,
    family: socket.AddressFamily,
    target: tuple[Any, ...],
    owner: ConnectOwner,
    retry_delays: tuple[float, ...] = (),
) -> Connector:
    """Start a connect from `source_ip` to `target`.

    Raises:
        EgressFailed: the first attempt failed for good before any packet (bind error,
            or an immediate connect error with no retry left).
    """
    connector = Connector(loop, pressure, source_ip, family, target, owner, retry_delays)
    failure = connector._attempt()
    if failure is not None:
        raise failure
    return connector
