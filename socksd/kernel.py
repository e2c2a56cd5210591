"""The kernel settings that decide capacity, and what is wrong with them.

Owns: reading the sysctls (of the calling process's network namespace), this process's
RLIMIT_NOFILE (`raise_nofile_soft()`, the only rlimit syscalls in socksd: it raises the
soft limit to the hard one) and the pure checks that turn them into operator warnings.
Must not: change any sysctl or the hard fd limit; socksd reports, the operator decides.

Facts behind the checks (shared/notes/port-binding.md, measured on Linux 6.18):
capacity per (egress IP, target) is the ephemeral range P; a quad closed by us stays
unusable for 60 s unless `tcp_tw_reuse = 1` (then `tcp_tw_reuse_delay`, with TCP
timestamps); a listening port inside the range is skipped by every egress connect.
A worker holds two fds per tunnel (client + upstream), so its soft RLIMIT_NOFILE, not
memory, is what caps its tunnels unless it is raised (a shell's default is 1,024).
"""

from __future__ import annotations

import ipaddress
import resource
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from socksd.config import Config, ListenAddress

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


# -- RLIMIT_NOFILE ------------------------------------------------------------------------

# What one worker needs, in fds (see nofile_needed()). Per tunnel: client + upstream (a UDP
# association holds 2-4, a BIND waiting for its peer 3).
NOFILE_PER_TUNNEL = 2
# A worker at rest holds 12 (stdio, epoll, eventfd, the signal socketpair, the stats
# pipe, its listener, ...); the rest is margin for what comes and goes (log and /proc
# files, the authenticator, a reload's overlap).
NOFILE_FIXED = 32
NOFILE_PER_RESOLVER_THREAD = 4  # getaddrinfo: DNS sockets, netlink, /etc/hosts
# splice(2) pipes in use at once (2 fds each): the default per-user pipe budget,
# fs.pipe-user-pages-soft = 16384 pages (64 MiB), holds 256 of workers/pipes.py's
# 256 KiB pipes; past it the relay copies instead of borrowing more.
SPLICE_PIPES_MAX = 256
# With no tunnel limit configured, the fd limit should let a worker hold this many
# tunnels: ~1.5 s of tunnels at the ~7,000/s one worker opens (bench/RESULTS.md), and
# above the old 4,096 hard-limit default (~2,000 tunnels), which is the case to catch.
NOFILE_FLOOR_TUNNELS = 10_000


@dataclass(frozen=True, slots=True)
class NofileLimits:
    """This process's RLIMIT_NOFILE: soft before and after start-up, and hard.

    RLIM_INFINITY (-1 in Python) means unlimited.
    """

    soft_at_start: int
    soft: int
    hard: int
    error: str | None = None  # why raising the soft limit failed, if it did

    def as_log(self) -> dict[str, Any]:
        return {
            "nofile_soft_at_start": self.soft_at_start,
            "nofile_soft": self.soft,
            "nofile_hard": self.hard,
        }


def nofile_soft_target(soft: int, hard: int) -> int | None:
    """The soft limit to set at start: the hard one; None if there is nothing to raise."""
    if soft == resource.RLIM_INFINITY or hard == resource.RLIM_INFINITY or soft >= hard:
        return None
    return hard


def nofile_needed(tunnels: int, listeners: int, resolver_threads: int, splice: bool) -> int:
    """Fds one worker needs to hold `tunnels` tunnels."""
    fixed = NOFILE_FIXED + listeners + NOFILE_PER_RESOLVER_THREAD * resolver_threads
    pipes = 2 * SPLICE_PIPES_MAX if splice else 0
    return NOFILE_PER_TUNNEL * tunnels + fixed + pipes


def tunnels_within(nofile: int, listeners: int, resolver_threads: int, splice: bool) -> int:
    """Tunnels one worker can hold with `nofile` fds (the inverse of nofile_needed())."""
    spare = nofile - nofile_needed(0, listeners, resolver_threads, splice)
    return max(0, spare // NOFILE_PER_TUNNEL)


def check_nofile(limits: NofileLimits, config: Config) -> list[tuple[str, dict[str, Any]]]:
    """Warnings (event name, fields) about an fd limit below what `config` needs.

    The need is for one worker (each is its own process with its own limit):
    `limits.max_tunnels[_per_worker]` as `config.worker_tunnel_limit()` gives it, or
    NOFILE_FLOOR_TUNNELS without one. It is compared with the soft limit the workers
    inherit, which is the hard one unless raising it failed.
    """
    warnings: list[tuple[str, dict[str, Any]]] = []
    if limits.error is not None:
        warnings.append(
            (
                "nofile_raise_failed",
                {
                    **limits.as_log(),
                    "error": limits.error,
                    "why": "workers run with the soft fd limit, below the hard one",
                    "fix": "start socksd with soft = hard (LimitNOFILE=N in the systemd unit, "
                    "ulimit -Sn $(ulimit -Hn) in a shell)",
                },
            )
        )
    if limits.soft == resource.RLIM_INFINITY:
        return warnings
    tunnel_limit = config.worker_tunnel_limit()
    wanted = tunnel_limit or NOFILE_FLOOR_TUNNELS
    shape = (len(config.listen), config.resolver.threads, config.relay_splice)
    needed = nofile_needed(wanted, *shape)
    if limits.soft < needed:
        fix = (
            "raise the hard limit: LimitNOFILE=N in the systemd unit, or ulimit -Hn N "
            "(as root) / nofile in limits.conf before starting socksd"
        )
        if tunnel_limit:
            fix += "; or lower limits.max_tunnels[_per_worker] to tunnels_within_limit"
        warnings.append(
            (
                "nofile_limit_low",
                {
                    **limits.as_log(),
                    "nofile_needed": needed,
                    "worker_tunnel_limit": tunnel_limit,
                    "tunnels_wanted": wanted,
                    "tunnels_within_limit": tunnels_within(limits.soft, *shape),
                    "why": "a tunnel holds 2 fds: past tunnels_within_limit a worker stops "
                    "accepting (accept_paused, errno emfile) short of tunnels_wanted",
                    "fix": fix,
                },
            )
        )
    return warnings


def raise_nofile_soft() -> NofileLimits:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (never the hard one).

    Children forked afterwards (the workers) inherit it. A failure (e.g. setrlimit denied
    by a seccomp filter) is returned in `error`, not raised: socksd still serves.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = nofile_soft_target(soft, hard)
    if target is None:
        return NofileLimits(soft_at_start=soft, soft=soft, hard=hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        return NofileLimits(soft_at_start=soft, soft=soft, hard=hard, error=str(exc))
    return NofileLimits(soft_at_start=soft, soft=target, hard=hard)
