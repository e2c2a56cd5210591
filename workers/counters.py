"""A worker's counters: what the acceptor, the sessions, the relay and the limits bump.

Owns: `WorkerCounters`, the plain totals since the worker started.
Must not: format, send or sum them (socksd.stats encodes them, workers.reporter sends
them), or import anything of the worker: every module that counts imports this one.
"""

from __future__ import annotations


class WorkerCounters:
    """Totals since the worker started; gauges are derived at report time."""

    __slots__ = (
        "accepted",
        "tunnels_opened",
        "tunnels_closed",
        "bytes_up",
        "bytes_down",
        "handshake_failures",
        "refused",
        "udp_datagrams_up",
        "udp_datagrams_down",
        "udp_bytes_up",
        "udp_bytes_down",
        "udp_dropped",
        "replies",
        "open_tunnels",
        "dropped_lines",
    )

    def __init__(self) -> None:
        self.accepted = 0
        self.tunnels_opened = 0
        self.tunnels_closed = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.handshake_failures: dict[str, int] = {}
        self.refused: dict[str, int] = {}  # by access rule or limit: reason -> count
        self.udp_datagrams_up = 0
        self.udp_datagrams_down = 0
        self.udp_bytes_up = 0
        self.udp_bytes_down = 0
        self.udp_dropped: dict[str, int] = {}  # reason -> datagrams
        self.replies: dict[int, int] = {}
        self.open_tunnels = 0
        self.dropped_lines = 0  # stats lines the full pipe refused (counted by the reporter)

    def handshake_failed(self, reason: str) -> None:
        """Count a client whose handshake failed, by reason."""
        self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1

    def refuse(self, reason: str) -> None:
        """Count a client or request refused by an access rule or a limit."""
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def replied(self, code: int) -> None:
        """Count a SOCKS reply sent, by reply code."""
        self.replies[code] = self.replies.get(code, 0) + 1
