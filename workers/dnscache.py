"""A worker's DNS answers, kept for as long as they may be used.

Owns: the per-worker cache of name -> addresses: positive answers for their TTL
(clamped to `resolver.min_ttl` .. `resolver.max_ttl`), NXDOMAIN / no-data answers for
`resolver.negative_ttl`, an expired positive answer kept `resolver.stale_ttl` longer
for serve-stale (RFC 8767: used only when the lookup that should refresh it fails
with SERVFAIL or a timeout), and the bound on entries (least recently used dropped).
Must not: do I/O or read a clock: every call is given `now` (loop time).

Destination rules are not applied here: a cached answer is checked like a fresh one,
by the session, on every tunnel.
"""

from __future__ import annotations

import socket
from collections import OrderedDict
from dataclasses import dataclass

# (family, IP text) pairs in the resolver's order (IPv4 first, then IPv6).
Ips = tuple[tuple[socket.AddressFamily, str], ...]


@dataclass(slots=True, eq=False)
class Entry:
    """One name's answer: `ips`, or the failure `reason` with no IPs."""

    ips: Ips
    reason: str | None  # "dns_nxdomain" / "dns_nodata" for a negative answer
    expires: float  # loop time; fresh until then
    stale_until: float  # loop time; a positive answer may be served stale until then


class DnsCache:
    """Bounded LRU of answers with TTLs; see the module docstring."""

    __slots__ = ("_entries", "_size", "_min_ttl", "_max_ttl", "_negative_ttl", "_stale_ttl")

    def __init__(
        self,
        *,
        size: int,
        min_ttl: float,
        max_ttl: float,
        negative_ttl: float,
        stale_ttl: float,
    ) -> None:
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._size = size
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._negative_ttl = negative_ttl
        self._stale_ttl = stale_ttl

    def retune(
        self, *, size: int, min_ttl: float, max_ttl: float, negative_ttl: float, stale_ttl: float
    ) -> None:
        """Take a reload's limits: entries are kept (the least recently used dropped
        down to `size`); the TTL clamps apply to answers cached from now on."""
        self._size = size
        self._min_ttl, self._max_ttl = min_ttl, max_ttl
        self._negative_ttl, self._stale_ttl = negative_ttl, stale_ttl
        while len(self._entries) > size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def fresh(self, name: str, now: float) -> Entry | None:
        """The answer for `name` if it is still within its TTL (a hit), else None."""
        entry = self._entries.get(name)
        if entry is None or entry.expires <= now:
            return None
        self._entries.move_to_end(name)
        return entry

    def stale(self, name: str, now: float) -> Entry | None:
        """An expired positive answer still within `stale_ttl`, for serve-stale."""
        entry = self._entries.get(name)
        if entry is None or not entry.ips or entry.stale_until <= now:
            return None
        return entry

    def answer(self, name: str, ips: Ips, ttl: float, now: float) -> Entry:
        """Keep a positive answer whose smallest record TTL is `ttl` seconds."""
        ttl = min(max(ttl, self._min_ttl), self._max_ttl)
        expires = now + ttl
        return self._put(name, Entry(ips, None, expires, expires + self._stale_ttl))

    def failure(self, name: str, reason: str, now: float) -> Entry:
        """Keep a negative answer (NXDOMAIN, no data) for `negative_ttl` seconds.

        It replaces a positive one: the name does not exist (any more)."""
        expires = now + self._negative_ttl
        return self._put(name, Entry((), reason, expires, expires))

    def _put(self, name: str, entry: Entry) -> Entry:
        entries = self._entries
        entries[name] = entry
        entries.move_to_end(name)
        if len(entries) > self._size:
            entries.popitem(last=False)
        return entry
