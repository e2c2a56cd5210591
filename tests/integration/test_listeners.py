"""Listening sockets: options that accepted clients inherit."""

from __future__ import annotations

import socket

from socksd.config import ListenAddress
from socksd.listeners import open_listener


def test_accepted_clients_inherit_tcp_nodelay():
    """The worker does not set TCP_NODELAY per client: Linux clones the listener's
    flags into each accepted socket, so small relayed writes are never held by Nagle."""
    listener = open_listener(ListenAddress("127.0.0.1", 0))
    listener.setblocking(True)
    try:
        client = socket.create_connection(listener.getsockname()[:2], timeout=5)
        accepted, _ = listener.accept()
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        accepted.close()
        client.close()
    finally:
        listener.close()
