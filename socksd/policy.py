"""Pure egress decisions: which source address a tunnel leaves from.

Owns: the ingress -> egress address rule (with the optional `[[egress.map]]`) and the
order candidate target addresses are tried in.
Must not: make syscalls.

The egress IP is the local IP the client connected to, so a customer who leases an IP
is seen by targets coming from exactly that IP. Where the host's egress addresses
differ from its ingress addresses, `egress.map` says which to use, per family. A
target of a family with no source address is refused; it is never silently sent from
another IP.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from socksd.config import EgressMapping

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

Candidate = tuple[str, socket.AddressFamily, tuple[Any, ...]]


def normalize_ip(text: str) -> str:
    """Return the canonical text of an IP; an IPv4-mapped IPv6 address becomes IPv4."""
    if ":" not in text:
        return text  # the kernel's dotted quad is canonical already (hot path: accept)
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return ip.compressed


def family_of(ip_text: str) -> socket.AddressFamily:
    return AF_INET6 if ":" in ip_text else AF_INET


class EgressPolicy:
    """Source addresses per (ingress IP, target family)."""

    def __init__(self, mappings: Sequence[EgressMapping] = ()) -> None:
        # Longest prefix first, so the most specific mapping wins.
        self._mappings = sorted(mappings, key=lambda m: -m.ingress.prefixlen)
        self._cache: dict[str, tuple[str | None, str | None]] = {}

    def _sources(self, ingress_ip: str) -> tuple[str | None, str | None]:
        cached = self._cache.get(ingress_ip)
        if cached is not None:
            return cached
        v4: str | None = ingress_ip if family_of(ingress_ip) == AF_INET else None
        v6: str | None = ingress_ip if v4 is None else None
        ip = ipaddress.ip_address(ingress_ip)
        for mapping in self._mappings:
            if ip.version == mapping.ingress.version and ip in mapping.ingress:
                v4 = mapping.ipv4 or v4
                v6 = mapping.ipv6 or v6
                break
        # Bounded: keys are the host's own addresses (what clients connected to).
        if len(self._cache) < 65536:
            self._cache[ingress_ip] = (v4, v6)
        return v4, v6

    def source(self, ingress_ip: str, family: socket.AddressFamily) -> str | None:
        """The source IP for a target of `family`, or None when there is none."""
        v4, v6 = self._sources(ingress_ip)
        return v4 if family == AF_INET else v6

    def order_candidates(
        self, candidates: Iterable[tuple[socket.AddressFamily, tuple[Any, ...]]], ingress_ip: str
    ) -> list[Candidate]:
        """Targets that have a source address, ingress family first, resolver order kept.

        Returns (source_ip, family, sockaddr) triples.
        """
        out: list[Candidate] = []
        for family, sockaddr in candidates:
            source = self.source(ingress_ip, family)
            if source is not None:
                out.append((source, family, sockaddr))
        if len(out) > 1:
            ingress_family = family_of(ingress_ip)
            out.sort(key=lambda c: c[1] != ingress_family)  # stable: resolver order kept
        return out
