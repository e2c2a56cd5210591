"""Listening sockets, opened before any worker starts.

Owns: creating, binding and listening the SOCKS sockets, with clear errors.
Must not: accept connections (workers do).

Each socket has SO_REUSEPORT so that several workers (one socket each) can share an
address; IPv6 sockets are IPv6-only, so "0.0.0.0:1080" and "[::]:1080" can both be
listed and each client keeps its own address family end to end.
"""

from __future__ import annotations

import socket

from socksd.config import ListenAddress, hostport
from socksd.errors import ListenError

BACKLOG = 4096


def open_listener(address: ListenAddress) -> socket.socket:
    """Bind and listen on `address`.

    Raises:
        ListenError: the address is in use, not configured on this host, or not allowed.
    """
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Accepted sockets inherit TCP_NODELAY from the listener (Linux clones the
        # listening socket): one setsockopt here instead of one per client.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((address.host, address.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {address}: {exc.strerror}") from None
    return sock


def bound(sock: socket.socket) -> tuple[str, int]:
    """(host, port) of a bound socket, as the kernel names it (IPv6 flow and scope
    left out): how the supervisor and its workers name a listen address to each other."""
    host, port = sock.getsockname()[:2]
    return (host, port)


def describe(sock: socket.socket) -> str:
    """ "host:port" of a bound socket, IPv6 in brackets."""
    return hostport(*bound(sock))


def open_slot_listeners(
    addresses: tuple[ListenAddress, ...], slots: int
) -> dict[ListenAddress, list[socket.socket]]:
    """One SO_REUSEPORT socket per (address, worker slot), all or none.

    The kernel spreads new connections over a reuseport group by hash; giving each
    worker slot its own socket (kept open by the supervisor too) means a worker that
    dies leaves its queue to its successor instead of resetting it. Port 0 is resolved
    by the first socket; the slot's siblings join the port it got.
    """
    opened: dict[ListenAddress, list[socket.socket]] = {}
    try:
        for address in addresses:
            opened[address] = grow_slots(address, [], slots)
    except ListenError:
        close_all(opened)
        raise
    return opened


def grow_slots(
    address: ListenAddress, socks: list[socket.socket], slots: int
) -> list[socket.socket]:
    """Return `socks` extended to `slots` sockets on the same (host, port)."""
    out = list(socks)
    try:
        while len(out) < slots:
            port = out[0].getsockname()[1] if out else address.port
            out.append(open_listener(ListenAddress(address.host, port)))
    except ListenError:
        for sock in out[len(socks) :]:
            sock.close()
        raise
    return out


def close_all(listeners: dict[ListenAddress, list[socket.socket]]) -> None:
    for socks in listeners.values():
        for sock in socks:
            sock.close()
