"""Port-pressure accounting for one worker's egress sockets.

Owns: counters per egress IP, gauges per (egress IP, target ip:port), the estimate of
quads not yet reusable, the `egress_exhausted` / `egress_pressure_high` events and the
snapshot (schema in `socksd.stats`).
Must not: create or close sockets; `workers.egress` and `workers.relay` report to it.

Cheap on the hot path: one dict lookup per connect, integer arithmetic per event, and
a fixed 8-bucket window per target for recent closes. Memory is bounded: at most
`max_targets` targets are tracked; past that the coldest quarter is dropped (a
customer spraying millions of targets cannot grow it). A dropped target's open tunnels
still hold their counters object, so its IP's figures stay exact.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from socksd.config import hostport
from socksd.kernel import KernelSettings
from socksd.stats import EgressIpStats, EgressSnapshot, TargetPressure
from workers.events import LogGate

_BUCKETS = 8
LOG_INTERVAL = 1.0  # at most one egress_exhausted line per (IP, target) per second
_HYSTERESIS = 0.9  # pressure must fall below threshold * this to re-arm the warning


@dataclass(slots=True, eq=False)
class IpCounters:
    """Counters of one egress IP (as operators see them: `socksd.stats.EgressIpStats`)."""

    ip: str
    window: float  # seconds a quad we closed stays unusable (TIME_WAIT/reuse)
    open: int = 0
    attempted: int = 0
    succeeded: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # errno name -> connects
    exhausted: int = 0
    retries: int = 0
    rescued: int = 0
    udp_open: int = 0  # UDP association sockets bound to this IP (one port each)
    bind_log: LogGate | None = None  # made at the first bind failure

    def fail(self, errno_name: str) -> None:
        self.failed[errno_name] = self.failed.get(errno_name, 0) + 1


@dataclass(slots=True, eq=False)
class TargetCounters:
    """Gauges of one (egress IP, target ip:port): what limits new connects to it."""

    ipc: IpCounters
    target: str
    open: int = 0
    exhausted: int = 0
    high: bool = False
    exhausted_log: LogGate | None = None  # made at the first exhaustion
    # Closes within the reuse window, in _BUCKETS buckets of `_width` seconds each.
    _width: float = field(init=False)
    _counts: list[int] = field(init=False)
    _epochs: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self._width = self.ipc.window / _BUCKETS
        self._counts = [0] * _BUCKETS
        self._epochs = [-1] * _BUCKETS

    def recent_closes(self, now: float) -> int:
        """Closes (by us, leaving TIME_WAIT) within the reuse window."""
        epoch = int(now / self._width)
        return sum(
            c for c, e in zip(self._counts, self._epochs, strict=True) if epoch - e < _BUCKETS
        )

    def release(self, now: float, time_wait: bool) -> None:
        """An egress socket to this target closed; `time_wait` if we closed first."""
        self.open -= 1
        self.ipc.open -= 1
        if time_wait:
            epoch = int(now / self._width)
            slot = epoch % _BUCKETS
            if self._epochs[slot] != epoch:
                self._epochs[slot] = epoch
                self._counts[slot] = 0
            self._counts[slot] += 1


class PortPressure:
    """All egress counters of one worker."""

    def __init__(
        self, settings: KernelSettings, threshold: float, max_targets: int, log: Any
    ) -> None:
        self.settings = settings
        self.ports = settings.ephemeral_ports
        self._threshold = threshold
        self._max_targets = max_targets
        self.log = log
        self.ips: dict[str, IpCounters] = {}
        # Keyed by (egress IP, target host, port): the "host:port" text is made once
        # per target, not once per connect.
        self.targets: dict[tuple[str, str, int], TargetCounters] = {}

    def retune(self, threshold: float, max_targets: int) -> None:
        """A reload's `egress.pressure_threshold` and `max_tracked_targets`: figures
        kept; a smaller table sheds its coldest targets at the next new one."""
        self._threshold = threshold
        self._max_targets = max_targets

    def ip(self, ip: str) -> IpCounters:
        ipc = self.ips.get(ip)
        if ipc is None:
            loopback = ipaddress.ip_address(ip).is_loopback
            ipc = self.ips[ip] = IpCounters(ip, self.settings.reuse_window(loopback))
        return ipc

    def target(self, ip: str, host: str, port: int) -> TargetCounters:
        key = (ip, host, port)
        tc = self.targets.get(key)
        if tc is None:
            if len(self.targets) >= self._max_targets:
                self._evict()
            tc = self.targets[key] = TargetCounters(self.ip(ip), hostport(host, port))
        return tc

    def _evict(self) -> None:
        """Drop the coldest quarter of the tracked targets (amortised O(log n))."""
        # Cached `now` is not needed for ordering: open sockets dominate the heat.
        ranked = sorted(self.targets.items(), key=lambda kv: (kv[1].open, kv[1].exhausted))
        for key, _ in ranked[: max(1, len(ranked) // 4)]:
            del self.targets[key]

    def pressure(self, tc: TargetCounters, now: float) -> float:
        return (tc.open + tc.recent_closes(now)) / self.ports

    def opened(self, tc: TargetCounters, now: float) -> None:
        """A connect() got a port for this (IP, target)."""
        tc.open += 1
        tc.ipc.open += 1
        if not tc.high and tc.open + sum(tc._counts) < self._threshold * self.ports:
            return  # far from the edge even counting every close in the window: cheap exit
        level = self.pressure(tc, now)
        if not tc.high and level >= self._threshold:
            tc.high = True
            self.log.warning(
                "egress_pressure_high",
                **self._where(tc, now),
                pressure=round(level, 4),
                threshold=self._threshold,
            )
        elif tc.high and level < self._threshold * _HYSTERESIS:
            tc.high = False

    def _where(self, tc: TargetCounters, now: float) -> dict[str, Any]:
        """The fields that place a pressure event: which pair, and how full it is."""
        return {
            "egress_ip": tc.ipc.ip,
            "target": tc.target,
            "open": tc.open,
            "recent_closes": tc.recent_closes(now),
            "ephemeral_ports": self.ports,
        }

    def exhausted(self, tc: TargetCounters, now: float, attempts: int) -> None:
        """No 4-tuple was free for (IP, target), retries included: the tunnel is refused."""
        tc.exhausted += 1
        tc.ipc.exhausted += 1
        gate = tc.exhausted_log
        if gate is None:
            gate = tc.exhausted_log = LogGate()
        suppressed = gate.open(now, LOG_INTERVAL)
        if suppressed is None:
            return
        self.log.warning(
            "egress_exhausted",
            **self._where(tc, now),
            attempts=attempts,
            exhausted_total=tc.exhausted,
            suppressed=suppressed,
        )

    def bind_failed(self, ipc: IpCounters, errno_name: str, now: float) -> None:
        """bind() of the source address failed: a configuration problem, not load."""
        if ipc.bind_log is None:
            ipc.bind_log = LogGate()
        if ipc.bind_log.open(now, LOG_INTERVAL) is None:
            return
        self.log.error(
            "egress_bind_failed",
            egress_ip=ipc.ip,
            errno=errno_name,
            why="the source address is not configured on this host"
            if errno_name == "eaddrnotavail"
            else "bind with IP_BIND_ADDRESS_NO_PORT and port 0 should never fail this way",
        )

    def snapshot(self, now: float, top: int = 20) -> EgressSnapshot:
        """The figures as the supervisor and operators see them; hottest targets first."""
        ips = tuple(
            EgressIpStats(
                ip=c.ip,
                open=c.open,
                attempted=c.attempted,
                succeeded=c.succeeded,
                failed=dict(c.failed),
                exhausted=c.exhausted,
                retries=c.retries,
                rescued=c.rescued,
                udp_open=c.udp_open,
            )
            for c in self.ips.values()
        )
        rows = []
        for tc in self.targets.values():
            recent = tc.recent_closes(now)
            if tc.open or recent or tc.exhausted:
                rows.append(
                    TargetPressure(
                        egress_ip=tc.ipc.ip,
                        target=tc.target,
                        open=tc.open,
                        recent_closes=recent,
                        exhausted=tc.exhausted,
                        pressure=round((tc.open + recent) / self.ports, 4),
                    )
                )
        rows.sort(key=lambda r: (r.pressure, r.exhausted), reverse=True)
        window = self.settings.reuse_window(loopback=False)
        return EgressSnapshot(
            ephemeral_ports=self.ports,
            reuse_window_s=window,
            ips=ips,
            targets=tuple(rows[:top]),
            tracked_targets=len(self.targets),
        )
