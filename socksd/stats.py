"""The egress port-pressure snapshot a worker reports (schema, encode/decode).

Owns: the shape of the snapshot that workers produce and the supervisor aggregates.
Must not: touch fds or know how the numbers are counted (workers/pressure.py does).

Counters are totals since the worker started; `open` and `recent_closes` are gauges.
`pressure` = (open + recent_closes) / ephemeral_ports for one (egress IP, target):
the fraction of that pair's 4-tuples that are in use or not yet reusable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class EgressIpStats:
    ip: str
    open: int = 0
    attempted: int = 0
    succeeded: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # errno name -> count
    exhausted: int = 0  # tunnels refused because no 4-tuple was free
    retries: int = 0  # connect() attempts repeated after EADDRNOTAVAIL
    rescued: int = 0  # tunnels that succeeded after at least one retry


@dataclass(frozen=True, slots=True)
class TargetPressure:
    egress_ip: str
    target: str
    open: int
    recent_closes: int
    exhausted: int
    pressure: float


@dataclass(frozen=True, slots=True)
class EgressSnapshot:
    ephemeral_ports: int
    reuse_window_s: float
    ips: tuple[EgressIpStats, ...] = ()
    targets: tuple[TargetPressure, ...] = ()  # hottest first
    tracked_targets: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EgressSnapshot:
        return cls(
            ephemeral_ports=data["ephemeral_ports"],
            reuse_window_s=data["reuse_window_s"],
            ips=tuple(EgressIpStats(**ip) for ip in data.get("ips", ())),
            targets=tuple(TargetPressure(**t) for t in data.get("targets", ())),
            tracked_targets=data.get("tracked_targets", 0),
        )

    def ip(self, ip: str) -> EgressIpStats:
        """Stats of one egress IP (zeros when it was never used)."""
        for item in self.ips:
            if item.ip == ip:
                return item
        return EgressIpStats(ip=ip)

    def target(self, egress_ip: str, target: str) -> TargetPressure | None:
        for item in self.targets:
            if item.egress_ip == egress_ip and item.target == target:
                return item
        return None
