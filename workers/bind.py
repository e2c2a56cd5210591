"""BIND (RFC 1928 section 4, SOCKS4 alike): the listener that waits for the peer.

Owns: the listening socket on the ingress-matched egress IP (port chosen by the
kernel), which peer is expected, accepting only that peer, and handing the accepted
socket back.
Must not: speak SOCKS (the session sends both replies, from what `listen()` raises or
returns) or relay (workers.relay does).

The listener's port comes from the ephemeral range (bind port 0), like a plain
`bind()` before connect: it is taken on that IP for every destination while the
listener lives, which is one reason `timeouts.bind` is finite.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, Protocol

from socksd import policy
from socksd.codec import AddressType, CommandRequest, Reply
from socksd.handlers import ReadOnlyHandler
from workers.context import WorkerContext
from workers.events import Refused, errno_name
from workers.loop import EVENT_READ


class BindOwner(Protocol):
    def on_bind_accepted(self, peer: socket.socket, address: tuple[Any, ...]) -> None: ...
    def on_crash(self, exc: BaseException) -> None: ...


class BindWaiter(ReadOnlyHandler):
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
        sock = socket.socket(policy.family_of(source_ip), socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
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

    def on_crash(self, exc: BaseException) -> None:
        self.cancel()
        self._owner.on_crash(exc)

    def cancel(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            self._ctx.loop.forget(sock.fileno())
            sock.close()


def listen(
    ctx: WorkerContext, owner: BindOwner, ingress_ip: str, request: CommandRequest
) -> BindWaiter:
    """A listener for the peer the BIND `request` names (DST.ADDR; 0.0.0.0 or :: = any
    peer), on the egress IP that matches `ingress_ip`.

    Raises:
        Refused: a name as the expected peer (0x08), no egress address of the ingress
            family (0x04), or the listener could not be made (0x01, with its errno).
    """
    if request.address_type is AddressType.DOMAINNAME:
        # The expected peer is named by address: a name would need a lookup whose
        # answer the peer's address may not match anyway.
        raise Refused(Reply.ADDRESS_TYPE_NOT_SUPPORTED, "bind_needs_address")
    source = ctx.policy.source(ingress_ip, policy.family_of(ingress_ip))
    if source is None:
        raise Refused(Reply.HOST_UNREACHABLE, "no_egress_for_family")
    peer_ip = request.host
    expected = None if peer_ip in ("0.0.0.0", "::") else policy.normalize_ip(peer_ip)
    try:
        return BindWaiter(ctx, owner, source, expected)
    except OSError as exc:
        raise Refused(Reply.GENERAL_FAILURE, "bind_failed", errno=errno_name(exc.errno)) from exc
