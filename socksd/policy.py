"""Pure egress decisions: which source address a tunnel leaves from.

Owns: the ingress -> egress address rule and the order candidate targets are tried in.
Must not: make syscalls.

The egress IP is the local IP the client connected to, so a customer who leases an IP
is seen by targets coming from exactly that IP. A target of the other family has no
source address; it is never silently sent from another IP.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Any

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6


def normalize_ip(text: str) -> str:
    """Return the canonical text of an IP; an IPv4-mapped IPv6 address becomes IPv4."""
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return ip.compressed


def family_of(ip_text: str) -> socket.AddressFamily:
    return AF_INET6 if ":" in ip_text else AF_INET


def egress_source(ingress_ip: str, family: socket.AddressFamily) -> str | None:
    """The source IP for a target of `family`, or None when there is none."""
    return ingress_ip if family_of(ingress_ip) == family else None


def order_candidates(
    candidates: Iterable[tuple[socket.AddressFamily, tuple[Any, ...]]], ingress_ip: str
) -> Sequence[tuple[str, socket.AddressFamily, tuple[Any, ...]]]:
    """Keep the targets that have a source address, ingress family first, order kept.

    Returns (source_ip, family, sockaddr) triples.
    """
    out = []
    for family, sockaddr in candidates:
        source = egress_source(ingress_ip, family)
        if source is not None:
            out.append((source, family, sockaddr))
    ingress_family = family_of(ingress_ip)
    out.sort(key=lambda c: c[1] != ingress_family)  # stable: resolver order kept
    return out
