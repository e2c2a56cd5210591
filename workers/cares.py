"""c-ares (through pycares) driven by the worker's own epoll loop: DNS without threads.

Owns: the worker's c-ares channel, registering the sockets c-ares opens with the loop
(its `sock_state_cb`), one loop timer for c-ares' own retransmission timeouts, and
turning a `getaddrinfo` result or status into IPs with a TTL or a failure reason.
Must not: cache, coalesce or time out lookups (`workers.resolver` does), or block:
c-ares only ever reads and writes non-blocking sockets when the loop says they are
ready, and answers from /etc/hosts come back within the call.

c-ares reads /etc/resolv.conf (nameservers, search, ndots, options) the way the system
resolver does; `resolver.nameservers` replaces the nameservers. /etc/hosts is answered
before a lookup gets here (`workers.hostsfile`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pycares

from socksd.config import ResolverConfig
from socksd.handlers import Handler
from workers.dnscache import Ips
from workers.loop import EVENT_READ, EVENT_WRITE, Loop, Timer

# (ips, ttl, None) for an answer; ((), 0, reason) for a failure.
Done = Callable[[Ips, float, "str | None"], None]

_BAD = pycares.ARES_SOCKET_BAD
_ERR = pycares.errno
# c-ares status -> the reason a tunnel's line gives. The last three are "the server
# did not answer usefully", which RFC 8767 serves a stale answer for.
REASONS: dict[int, str] = {
    _ERR.ARES_ENOTFOUND: "dns_nxdomain",
    _ERR.ARES_ENODATA: "dns_nodata",
    _ERR.ARES_ESERVFAIL: "dns_servfail",
    _ERR.ARES_ETIMEOUT: "dns_timeout",
    _ERR.ARES_EREFUSED: "dns_refused",
    _ERR.ARES_ECONNREFUSED: "dns_unreachable",
}


class _Socket:
    """Loop handler of one socket c-ares opened (UDP or TCP to a nameserver)."""

    __slots__ = ("fd", "mask", "_backend")

    def __init__(self, fd: int, backend: CaresBackend) -> None:
        self.fd = fd
        self.mask = 0
        self._backend = backend

    def on_readable(self) -> None:
        self._backend.process(self.fd, _BAD)

    def on_writable(self) -> None:
        self._backend.process(_BAD, self.fd)

    def on_crash(self, exc: BaseException) -> None:
        raise exc  # a bug in the resolver's plumbing is the worker's, not a session's


class CaresBackend:
    """Starts lookups on the channel; results come to each lookup's `done`."""

    def __init__(self, loop: Loop, config: ResolverConfig, lookup_timeout: float) -> None:
        self._loop = loop
        self._sockets: dict[int, _Socket] = {}
        self._timer: Timer | None = None
        self._pending = 0
        self._retired = False
        options: dict[str, Any] = {
            "sock_state_cb": self._sock_state,
            # c-ares' per-try timeout: its tries fit in the time a lookup is given.
            "timeout": max(0.1, lookup_timeout / config.tries),
            "tries": config.tries,
            # No `lookups` option ("b": DNS only): pycares 5.2.1 hands c-ares a string it
            # has already freed, and lookups then fail at random (ECONNREFUSED, no
            # query sent). /etc/hosts names are answered before they reach c-ares
            # (workers.hostsfile), so its own hosts step finds nothing to answer.
        }
        if config.nameservers:
            options["servers"] = list(config.nameservers)
        self._channel: pycares.Channel | None = pycares.Channel(**options)

    def lookup(self, name: str, done: Done) -> None:
        """Both families of `name` (an A and an AAAA query); `done` once, maybe before
        this returns (c-ares' own cache, or a name such as "localhost")."""
        assert self._channel is not None  # a retired backend gets no new lookups
        self._pending += 1
        self._channel.getaddrinfo(
            name,
            None,
            family=socket.AF_UNSPEC,
            type=socket.SOCK_STREAM,
            callback=_Reply(self, done).deliver,
        )
        self._arm()

    def finished(self) -> None:
        self._pending -= 1
        if self._retired and self._pending <= 0:
            # Not from inside c-ares' own callback: on the next loop pass.
            self._loop.call_later(0.0, self.close)

    def retire(self) -> None:
        """Replaced by a reload: close once the lookups under way have their answers."""
        self._retired = True
        if self._pending <= 0:
            self._loop.call_later(0.0, self.close)

    def process(self, read_fd: int, write_fd: int) -> None:
        """A c-ares socket is ready (or, with both BAD, its timeouts are due)."""
        if self._channel is not None:
            self._channel.process_fd(read_fd, write_fd)
            self._arm()

    def close(self) -> None:
        if self._channel is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sock in list(self._sockets.values()):
            self._sock_state(sock.fd, False, False)
        self._channel.close()
        self._channel = None

    def _sock_state(self, fd: int, readable: bool, writable: bool) -> None:
        """c-ares opened, changed or is closing one of its sockets."""
        sock = self._sockets.get(fd)
        if sock is None:
            if not (readable or writable):
                return
            sock = self._sockets[fd] = _Socket(fd, self)
        want = (EVENT_READ if readable else 0) | (EVENT_WRITE if writable else 0)
        handler: Handler = sock
        sock.mask = self._loop.set_interest(fd, sock.mask, want, handler)
        if not want:
            del self._sockets[fd]  # c-ares closes it next

    def _arm(self) -> None:
        """One loop timer for c-ares' next retransmission or timeout, while lookups run."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending > 0 and self._channel is not None:
            # 0.0 is also c-ares' "no timeout pending": poll then, never spin.
            delay = self._channel.timeout() or 0.05  # type: ignore[no-untyped-call]
            self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.process(_BAD, _BAD)


class _Reply:
    """One getaddrinfo's callback: the result turned into IPs and a TTL, or a reason."""

    __slots__ = ("_backend", "_done")

    def __init__(self, backend: CaresBackend, done: Done) -> None:
        self._backend = backend
        self._done = done

    def deliver(self, result: Any, status: int | None) -> None:
        self._backend.finished()
        if result is None or status:
            if status == _ERR.ARES_ECANCELLED or status == _ERR.ARES_EDESTRUCTION:
                return  # the worker is stopping
            self._done((), 0.0, REASONS.get(status or 0, "dns_error"))
            return
        seen: set[tuple[socket.AddressFamily, str]] = set()
        v4: list[tuple[socket.AddressFamily, str]] = []
        v6: list[tuple[socket.AddressFamily, str]] = []
        ttl = min((c.ttl for c in result.cnames), default=None)
        for node in result.nodes:
            family = node.family
            if family != socket.AF_INET and family != socket.AF_INET6:
                continue
            ip = node.addr[0]
            item = (family, ip.decode("ascii") if isinstance(ip, bytes) else ip)
            if item in seen:
                continue
            seen.add(item)
            (v4 if family == socket.AF_INET else v6).append(item)
            ttl = node.ttl if ttl is None else min(ttl, node.ttl)
        if not seen:
            self._done((), 0.0, "dns_nodata")
            return
        # IPv4 first, as getaddrinfo() orders them on a host without IPv6 routes; the
        # session's policy picks the ingress family anyway.
        self._done((*v4, *v6), float(ttl or 0), None)
