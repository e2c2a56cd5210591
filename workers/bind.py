"""BIND (RFC 1928 section 4, SOCKS4 alike): the listener that waits for the peer.

Owns: the listening socket on the ingress-matched egress IP (port chosen by the
kernel), accepting only the expected peer, and handing the accepted socket back.
Must not: speak SOCKS (the session sends both replies) or relay (workers.relay does).

The listener's port comes from the ephemeral range (bind port 0), like a plain
`bind()` before connect: it is taken on that IP for every destination while the
listener lives, which is one reason `timeouts.bind` is finite.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, Protocol

from socksd import policy
from workers.context import WorkerContext
from workers.loop import EVENT_READ


class BindOwner(Protocol):
    def on_bind_accepted(self, peer: socket.socket, address: tuple[Any, ...]) -> None: ...
    def on_crash(self, exc: BaseException) -> None: ...


class BindWaiter:
    """One BIND's listener; `accepted` goes to the owner once, then it closes itself."""

    __slots__ = ("_ctx", "_owner", "sock", "_expected", "address", "rejected")

    def __init__(
        self,
        ctx: WorkerContext,
        owner: BindOwner,
        source_ip: str,
        expected_ip: str | None,
    ) -> None:
        """Raises OSError when the listener cannot be made (the session replies 0x01)."""
        self._ctx = ctx
        self._owner = owner
        self._expected = expected_ip  # None: any peer (the client gave 0.0.0.0)
        family = socket.AF_INET6 if ":" in source_ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            sock.bind((source_ip, 0))
            sock.listen(1)
        except OSError:
            sock.close()
            raise
        self.sock: socket.socket | None = sock
        self.address: tuple[str, int] = sock.getsockname()[:2]
        self.rejected = 0  # connections from another address than the expected peer
        ctx.loop.register(sock, EVENT_READ, self)

    def on_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            peer, address = sock.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                return
            raise
        if self._expected is not None and policy.normalize_ip(address[0]) != self._expected:
            # Only the peer the client named may take the place (RFC 1928 section 4).
            self.rejected += 1
            peer.close()
            return
        peer.setblocking(False)
        self.cancel()
        self._owner.on_bind_accepted(peer, address)

    def on_writable(self) -> None:  # pragma: no cover - registered for read only
        raise AssertionError("bind listener registered for write")

    def on_crash(self, exc: BaseException) -> None:
        self.cancel()
        self._owner.on_crash(exc)

    def cancel(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            self._ctx.loop.forget(sock.fileno())
            sock.close()
