"""The kernel settings that decide egress capacity, and what is wrong with them.

Owns: reading the sysctls (of the calling process's network namespace) and the pure
checks that turn them into operator warnings.
Must not: change any setting; socksd reports, the operator decides.

Facts behind the checks (shared/notes/port-binding.md, measured on Linux 6.18):
capacity per (egress IP, target) is the ephemeral range P; a quad closed by us stays
unusable for 60 s unless `tcp_tw_reuse = 1` (then `tcp_tw_reuse_delay`, with TCP
timestamps); a listening port inside the range is skipped by every egress connect.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from socksd.config import ListenAddress

TIME_WAIT_S = 60.0  # Linux's fixed TCP_TIMEWAIT_LEN


@dataclass(frozen=True, slots=True)
class KernelSettings:
    port_range: tuple[int, int]
    reserved_ports: tuple[tuple[int, int], ...] = ()
    tcp_tw_reuse: int | None = None
    tcp_tw_reuse_delay_ms: int | None = None
    tcp_timestamps: int | None = None

    @property
    def ephemeral_ports(self) -> int:
        """P: ports in ip_local_port_range that are not reserved."""
        lo, hi = self.port_range
        total = max(0, hi - lo + 1)
        for r_lo, r_hi in self.reserved_ports:
            total -= max(0, min(hi, r_hi) - max(lo, r_lo) + 1)
        return max(total, 1)

    def reuse_window(self, loopback: bool) -> float:
        """Seconds a quad we closed stays unusable for a new connect to the same target."""
        reuse = self.tcp_tw_reuse == 1 or (self.tcp_tw_reuse == 2 and loopback)
        if reuse and self.tcp_timestamps != 0:
            return (self.tcp_tw_reuse_delay_ms or 1000) / 1000.0
        return TIME_WAIT_S

    def is_reserved(self, port: int) -> bool:
        return any(lo <= port <= hi for lo, hi in self.reserved_ports)

    def as_log(self) -> dict[str, Any]:
        return {
            "ip_local_port_range": list(self.port_range),
            "ip_local_reserved_ports": [list(r) for r in self.reserved_ports],
            "ephemeral_ports": self.ephemeral_ports,
            "tcp_tw_reuse": self.tcp_tw_reuse,
            "tcp_tw_reuse_delay_ms": self.tcp_tw_reuse_delay_ms,
            "tcp_timestamps": self.tcp_timestamps,
        }


def _read(root: Path, name: str) -> str | None:
    try:
        return (root / name).read_text().strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def parse_port_list(text: str) -> tuple[tuple[int, int], ...]:
    """Parse ip_local_reserved_ports ("8080,9000-9010") into inclusive ranges."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.append((int(lo), int(hi or lo)))
    return tuple(out)


def read_kernel_settings(root: str | Path = "/proc/sys/net/ipv4") -> KernelSettings:
    """Read the settings of this process's network namespace."""
    root = Path(root)
    range_text = _read(root, "ip_local_port_range") or "32768 60999"
    lo, hi = (int(x) for x in range_text.split())
    return KernelSettings(
        port_range=(lo, hi),
        reserved_ports=parse_port_list(_read(root, "ip_local_reserved_ports") or ""),
        tcp_tw_reuse=_int(_read(root, "tcp_tw_reuse")),
        tcp_tw_reuse_delay_ms=_int(_read(root, "tcp_tw_reuse_delay")),
        tcp_timestamps=_int(_read(root, "tcp_timestamps")),
    )


def _is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def check(
    settings: KernelSettings, listening: Iterable[ListenAddress]
) -> list[tuple[str, dict[str, Any]]]:
    """Warnings (event name, fields) about settings that cost egress capacity."""
    warnings: list[tuple[str, dict[str, Any]]] = []
    lo, hi = settings.port_range
    listening = list(listening)
    for address in listening:
        if lo <= address.port <= hi and not settings.is_reserved(address.port):
            warnings.append(
                (
                    "listen_port_in_ephemeral_range",
                    {
                        "listen": str(address),
                        "ip_local_port_range": [lo, hi],
                        "why": "this port is skipped by every egress connect while socksd listens",
                        "fix": "listen outside the range or add the port to "
                        "net.ipv4.ip_local_reserved_ports",
                    },
                )
            )
    if settings.tcp_tw_reuse != 1 and any(not _is_loopback(a.host) for a in listening):
        warnings.append(
            (
                "tcp_tw_reuse_not_enabled",
                {
                    "tcp_tw_reuse": settings.tcp_tw_reuse,
                    "why": "quads socksd closes stay unusable for 60 s (TIME_WAIT)",
                    "fix": "sysctl net.ipv4.tcp_tw_reuse=1",
                },
            )
        )
    if settings.tcp_timestamps == 0:
        warnings.append(
            (
                "tcp_timestamps_disabled",
                {"why": "TIME_WAIT reuse needs TCP timestamps", "fix": "net.ipv4.tcp_timestamps=1"},
            )
        )
    return warnings
