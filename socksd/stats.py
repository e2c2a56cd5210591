"""Stats: the egress snapshot, the worker -> supervisor lines, and their aggregation.

Owns: the shape of what workers report and how the supervisor sums it.
Must not: touch fds or know how the numbers are counted (workers/ does).

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
    udp_open: int = 0  # UDP ASSOCIATE egress sockets: one local UDP port each


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


# -- worker -> supervisor lines ------------------------------------------------------------

PIPE_LINE_MAX = 4000  # < PIPE_BUF (4096): a write of one line is atomic


def encode_egress_lines(snapshot: EgressSnapshot, header: dict[str, Any]) -> list[bytes]:
    """Split a snapshot into `egress` lines of at most PIPE_LINE_MAX bytes each.

    A worker may serve hundreds of leased IPs; one line cannot hold them all.
    """
    import orjson  # local: the schema part of this module stays import-light

    base = {**header, "kind": "egress", "ephemeral_ports": snapshot.ephemeral_ports}
    items: list[tuple[str, dict[str, Any]]] = [("ips", asdict(i)) for i in snapshot.ips]
    items += [("targets", asdict(t)) for t in snapshot.targets]
    parts: list[dict[str, Any]] = []
    current: dict[str, Any] = {"ips": [], "targets": []}
    size = len(orjson.dumps({**base, **current, "part": 0, "parts": 0})) + 16
    for key, item in items:
        n = len(orjson.dumps(item)) + 1
        if size + n > PIPE_LINE_MAX and (current["ips"] or current["targets"]):
            parts.append(current)
            current = {"ips": [], "targets": []}
            size = len(orjson.dumps({**base, **current, "part": 0, "parts": 0})) + 16
        if size + n <= PIPE_LINE_MAX:
            current[key].append(item)
            size += n
    parts.append(current)
    return [
        orjson.dumps({**base, **part, "part": i, "parts": len(parts)}) + b"\n"
        for i, part in enumerate(parts)
    ]


def add_counters(into: dict[str, Any], src: dict[str, Any]) -> None:
    """Add nested numeric dicts: {"a": 1, "b": {"x": 2}} += {"a": 3, "b": {"y": 1}}."""
    for key, value in src.items():
        if isinstance(value, dict):
            add_counters(into.setdefault(key, {}), value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            into[key] = into.get(key, 0) + value


@dataclass(slots=True)
class WorkerView:
    """What the supervisor knows of one worker process."""

    slot: int
    gen: int
    pid: int
    started: float
    last_seen: float
    counters: dict[str, Any] = field(default_factory=dict)
    gauges: dict[str, Any] = field(default_factory=dict)
    egress_ips: list[dict[str, Any]] = field(default_factory=list)
    egress_targets: list[dict[str, Any]] = field(default_factory=list)
    ephemeral_ports: int = 0
    hello: bool = False
    _pending: dict[str, Any] = field(default_factory=dict)

    def feed(self, msg: dict[str, Any], now: float) -> None:
        self.last_seen = now
        kind = msg.get("kind")
        if kind == "hello":
            self.hello = True
        elif kind == "stats":
            self.counters = msg.get("counters", {})
            self.gauges = msg.get("gauges", {})
        elif kind == "egress":
            seq = msg.get("seq")
            if self._pending.get("seq") != seq:
                self._pending = {"seq": seq, "ips": [], "targets": [], "got": 0}
            self._pending["ips"] += msg.get("ips", [])
            self._pending["targets"] += msg.get("targets", [])
            self._pending["got"] += 1
            if self._pending["got"] == msg.get("parts"):
                self.egress_ips = self._pending["ips"]
                self.egress_targets = self._pending["targets"]
                self.ephemeral_ports = msg.get("ephemeral_ports", 0)
                self._pending = {}


_IP_FIELDS = ("open", "attempted", "succeeded", "exhausted", "retries", "rescued", "udp_open")


def aggregate_egress(views: list[WorkerView], top: int = 20) -> dict[str, Any]:
    """Sum the workers' egress figures per IP and per (IP, target)."""
    ports = max((v.ephemeral_ports for v in views), default=0) or 1
    ips: dict[str, dict[str, Any]] = {}
    targets: dict[tuple[str, str], dict[str, Any]] = {}
    for view in views:
        for ip in view.egress_ips:
            row = ips.setdefault(ip["ip"], {"ip": ip["ip"], "failed": {}})
            for f in _IP_FIELDS:
                row[f] = row.get(f, 0) + ip.get(f, 0)
            add_counters(row["failed"], ip.get("failed", {}))
        for t in view.egress_targets:
            key = (t["egress_ip"], t["target"])
            row = targets.setdefault(
                key,
                {
                    "egress_ip": key[0],
                    "target": key[1],
                    "open": 0,
                    "recent_closes": 0,
                    "exhausted": 0,
                },
            )
            for f in ("open", "recent_closes", "exhausted"):
                row[f] += t.get(f, 0)
    for row in targets.values():
        row["pressure"] = round((row["open"] + row["recent_closes"]) / ports, 4)
    hot = sorted(targets.values(), key=lambda r: (r["pressure"], r["exhausted"]), reverse=True)
    return {
        "ephemeral_ports": ports,
        "ips": sorted(ips.values(), key=lambda r: r["ip"]),
        "targets": hot[:top],
    }
