"""A worker's counters: what the acceptor, the sessions, the relay and the limits bump.

Owns: `WorkerCounters`, the plain totals since the worker started.
Must not: format, send or sum them (socksd.stats encodes them, workers.reporter sends
them), or import anything of the worker: every module that counts imports this one.
"""

from __future__ import annotations

from typing import Any


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
        "dns",
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
        self.dns = DnsCounters()

    def handshake_failed(self, reason: str) -> None:
        """Count a client whose handshake failed, by reason."""
        self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1

    def refuse(self, reason: str) -> None:
        """Count a client or request refused by an access rule or a limit."""
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def replied(self, code: int) -> None:
        """Count a SOCKS reply sent, by reply code."""
        self.replies[code] = self.replies.get(code, 0) + 1


# Upper bounds (ms) of the DNS lookup latency buckets; one more bucket, "inf", above.
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class DnsCounters:
    """A worker's name resolution, totals since it started (`workers.resolver` counts)."""

    __slots__ = (
        "lookups",
        "hits",
        "misses",
        "coalesced",
        "stale",
        "failures",
        "latency_ms",
        "latency_s_total",
    )

    def __init__(self) -> None:
        self.lookups = 0  # lookups sent to the backend (c-ares: one query per family)
        self.hits = 0  # answered from the cache, positive or negative
        self.misses = 0  # not in the cache (or expired): a lookup started
        self.coalesced = 0  # asked while a lookup of the same name was under way
        self.stale = 0  # an expired answer served because its refresh failed
        self.failures: dict[str, int] = {}  # lookups that failed, by reason
        # Lookups by how long they took: upper bound in ms (as text) -> count.
        self.latency_ms: dict[str, int] = {}
        self.latency_s_total = 0.0  # the sum of those lookups' times (Prometheus _sum)

    def failed(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def took(self, seconds: float) -> None:
        self.latency_s_total += seconds
        ms = seconds * 1000
        key = next((str(b) for b in LATENCY_BUCKETS_MS if ms <= b), "inf")
        self.latency_ms[key] = self.latency_ms.get(key, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "lookups": self.lookups,
            "hits": self.hits,
            "misses": self.misses,
            "coalesced": self.coalesced,
            "stale": self.stale,
            "failures": dict(self.failures),
            "latency_ms": dict(self.latency_ms),
            "latency_s_total": round(self.latency_s_total, 6),
        }
