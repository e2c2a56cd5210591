"""Stats: the egress snapshot, the worker -> supervisor lines, and their aggregation.

Owns: the shape of what workers report, its encoding as pipe lines (worker side) and
their decoding (supervisor side), and the aggregate `socksd stats --json`, the
control socket, `/metrics` and the `stats` log event are made from.
Must not: touch fds, read clocks, or know how the numbers are counted (workers/ does);
callers pass in the figures, the time and the header, and write the bytes themselves.

Counters are totals since the worker started; `open` and `recent_closes` are gauges.
`pressure` = (open + recent_closes) / ephemeral_ports for one (egress IP, target):
the fraction of that pair's 4-tuples that are in use or not yet reusable.

A line is one orjson object and a newline, at most PIPE_LINE_MAX bytes, so the kernel
writes it whole or not at all. A flush is one `stats` line and as many `egress` lines
as the snapshot needs; `hello` and `bye` open and close a worker's stream.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NotRequired, Protocol, TypedDict, cast

import orjson

from socksd.timewait import TimeWaitSample


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
LINE_VERSION = 1


@dataclass(frozen=True, slots=True)
class LineHeader:
    """What every line starts with: who wrote it and which flush it belongs to."""

    worker: int  # the slot
    gen: int
    pid: int
    seq: int  # the flush; the `egress` parts of one flush share it
    ts: float  # wall clock, seconds

    def as_dict(self) -> dict[str, Any]:
        """The header's keys, in the order they have on the wire."""
        return {
            "v": LINE_VERSION,
            "worker": self.worker,
            "gen": self.gen,
            "pid": self.pid,
            "seq": self.seq,
            "ts": self.ts,
        }


class DnsSource(Protocol):
    """The worker's DNS figures (`workers.counters.DnsCounters`)."""

    def as_dict(self) -> dict[str, Any]: ...


class CounterSource(Protocol):
    """The worker's totals a `stats` line is made of (`workers.counters.WorkerCounters`):
    the PLAIN_TOTALS, read by name, and these.

    A protocol rather than an import: this module is the supervisor's too and depends
    on no worker module.
    """

    @property
    def replies(self) -> Mapping[int, int]: ...
    @property
    def open_tunnels(self) -> int: ...
    @property
    def dropped_lines(self) -> int: ...
    @property
    def dns(self) -> DnsSource: ...


class StatsCounters(TypedDict):
    """The `counters` of a `stats` line: totals since the worker started."""

    accepted: int
    tunnels_opened: int
    tunnels_closed: int
    bytes_up: int
    bytes_down: int
    handshake_failures: NotRequired[dict[str, int]]  # left out of a truncated line
    refused: dict[str, int]
    udp_datagrams_up: int
    udp_datagrams_down: int
    udp_bytes_up: int
    udp_bytes_down: int
    udp_dropped: dict[str, int]
    replies: dict[str, int]  # reply code as text: JSON keys are strings
    egress_errors: dict[str, int]
    retries: int
    rescued: int
    exhausted: int
    dropped_lines: int
    # lookups, hits, misses, coalesced, stale, failures {reason: n}, latency_ms {bucket: n},
    # latency_s_total: see workers.counters.DnsCounters.
    dns: dict[str, Any]


# The worker's totals that go onto a `stats` line as they are: StatsCounters' keys up
# to `udp_dropped`, in wire order (the others are derived: see stats_message()).
_COUNTER_KEYS = list(StatsCounters.__annotations__)
PLAIN_TOTALS = tuple(_COUNTER_KEYS[: _COUNTER_KEYS.index("udp_dropped") + 1])


class StatsGauges(TypedDict):
    """The `gauges` of a `stats` line: figures of the moment."""

    open_tunnels: int
    open_sessions: int  # connections still in their handshake


class StatsMessage(TypedDict):
    """The body of a `stats` line (the header's keys come first on the wire)."""

    kind: Literal["stats"]
    counters: StatsCounters
    gauges: StatsGauges
    truncated: NotRequired[bool]


def stats_message(counters: CounterSource, egress: EgressSnapshot, open_conns: int) -> StatsMessage:
    """Build the body of a worker's `stats` line.

    Args:
        counters: the worker's totals.
        egress: its egress snapshot; the per-IP retries, rescues, exhaustions and
            errno counts are summed into the line, so the totals need no `egress` line.
        open_conns: connections open in the worker, tunnels and handshakes together.

    Returns:
        The `stats` body, keys in wire order.
    """
    egress_errors: dict[str, int] = {}
    retries = rescued = exhausted = 0
    for ip in egress.ips:
        retries += ip.retries
        rescued += ip.rescued
        exhausted += ip.exhausted
        for name, n in ip.failed.items():
            egress_errors[name] = egress_errors.get(name, 0) + n
    c = counters
    totals: dict[str, Any] = {name: getattr(c, name) for name in PLAIN_TOTALS}
    return {
        "kind": "stats",
        # PLAIN_TOTALS are StatsCounters' first keys, the rest follow.
        "counters": cast(
            StatsCounters,
            {
                **totals,
                "replies": {str(k): v for k, v in c.replies.items()},
                "egress_errors": egress_errors,
                "retries": retries,
                "rescued": rescued,
                "exhausted": exhausted,
                "dropped_lines": c.dropped_lines,
                "dns": c.dns.as_dict(),
            },
        ),
        "gauges": {
            "open_tunnels": c.open_tunnels,
            "open_sessions": open_conns - c.open_tunnels,
        },
    }


def encode_line(header: LineHeader, body: Mapping[str, Any]) -> bytes:
    """Encode one line: the header's keys, then the body's, then a newline.

    Args:
        header: who writes the line.
        body: `{"kind": ...}` and the kind's keys.

    Returns:
        The line. When it would exceed PIPE_LINE_MAX, `counters.handshake_failures`
        is left out and `"truncated": true` added instead.
    """
    line = orjson.dumps({**header.as_dict(), **body}) + b"\n"
    if len(line) <= PIPE_LINE_MAX:
        return line
    # Only handshake-failure reasons and errno names are open-ended, and both come from
    # fixed sets; drop the detail rather than break atomicity.
    short = {**body, "truncated": True}
    if "counters" in body:
        short["counters"] = {k: v for k, v in body["counters"].items() if k != "handshake_failures"}
    return orjson.dumps({**header.as_dict(), **short}) + b"\n"


def encode_egress_lines(snapshot: EgressSnapshot, header: LineHeader) -> list[bytes]:
    """Split a snapshot into `egress` lines of at most PIPE_LINE_MAX bytes each.

    A worker may serve hundreds of leased IPs; one line cannot hold them all.

    Args:
        snapshot: the worker's egress figures.
        header: the flush's header; every part carries its `seq`, so the supervisor
            knows which parts belong together.

    Returns:
        One line per part, each with `part` (from 0) and `parts`. An item that cannot
        fit a line of its own is left out.
    """
    base = {**header.as_dict(), "kind": "egress", "ephemeral_ports": snapshot.ephemeral_ports}
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


def encode_report(
    header: LineHeader, counters: CounterSource, egress: EgressSnapshot, open_conns: int
) -> list[bytes]:
    """Encode one flush: the `stats` line, then the `egress` lines.

    Args:
        header: the flush's header (one `seq` for all its lines).
        counters: the worker's totals.
        egress: its egress snapshot.
        open_conns: connections open in the worker, tunnels and handshakes together.

    Returns:
        The lines, each to be written with one write(2).
    """
    stats = encode_line(header, stats_message(counters, egress, open_conns))
    return [stats, *encode_egress_lines(egress, header)]


# -- the supervisor's side -------------------------------------------------------------------


def add_counters(into: dict[str, Any], src: Mapping[str, Any]) -> None:
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
    _buf: bytes = b""  # the start of a line whose end has not been read yet

    def feed_bytes(self, data: bytes, now: float) -> list[str]:
        """Take what was read from the worker's pipe; whole lines are applied.

        Args:
            data: the bytes read, cut anywhere: a partial line waits for the rest.
            now: the supervisor's monotonic clock (the worker was seen then).

        Returns:
            Why lines were rejected, one message per bad line (none: all applied).
        """
        *lines, self._buf = (self._buf + data).split(b"\n")
        errors = []
        for line in lines:
            try:
                self.feed(orjson.loads(line), now)
            except (orjson.JSONDecodeError, TypeError, KeyError) as exc:
                errors.append(str(exc))
        return errors

    def feed(self, msg: dict[str, Any], now: float) -> None:
        """Apply one decoded line: a stats line replaces the figures, egress parts
        are collected until the flush's last one has arrived."""
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


# -- the aggregate ---------------------------------------------------------------------------
# Its JSON is an interface (`socksd stats --json`, socksd.metrics, socksd.control's
# table): the keys below, in this order, are what every reader sees.


class SupervisorSummary(TypedDict):
    pid: int
    generation: int
    reloads: int
    workers_wanted: int
    uptime_s: float
    config: str


class Totals(TypedDict):
    """The sums over every worker, the ones that are gone included (counters only)."""

    counters: dict[str, Any]
    gauges: dict[str, Any]


class WorkerRow(TypedDict):
    """One worker process, or (`alive` false, `pid` None) a slot waiting for one."""

    slot: int
    gen: int
    pid: int | None
    alive: bool
    last_seen_s: float | None
    restarts: int
    counters: dict[str, Any]
    gauges: dict[str, Any]


class EgressIpRow(TypedDict):
    ip: str
    failed: dict[str, int]  # errno name -> count
    open: int
    attempted: int
    succeeded: int
    exhausted: int
    retries: int
    rescued: int
    udp_open: int


class TargetRow(TypedDict):
    egress_ip: str
    target: str
    open: int
    recent_closes: int
    exhausted: int
    pressure: float


class TimeWaitPairRow(TypedDict):
    egress_ip: str
    target: str
    count: int
    pressure: float


class TimeWaitSummary(TypedDict):
    total: int
    truncated: bool
    by_pair: list[TimeWaitPairRow]


class EgressSummary(TypedDict):
    ephemeral_ports: int
    ips: list[EgressIpRow]  # by IP
    targets: list[TargetRow]  # hottest first
    time_wait: TimeWaitSummary


class DnsSummary(TypedDict):
    """Name resolution over every worker: the totals, and the latency percentiles read
    off the summed histogram (the upper bound of the bucket they fall in; None: no
    lookup yet, or above the last bound)."""

    lookups: int
    hits: int
    misses: int
    coalesced: int
    stale: int
    failures: dict[str, int]
    hit_ratio: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None


class Aggregate(TypedDict):
    supervisor: SupervisorSummary
    total: Totals
    workers: list[WorkerRow]
    egress: EgressSummary
    dns: DnsSummary


@dataclass(frozen=True, slots=True)
class SupervisorFacts:
    """What only the supervisor knows, as the aggregate needs it."""

    pid: int
    generation: int  # of the workers' processes (only a restart starts another)
    reloads: int  # configs applied in place since start
    started: float  # monotonic
    config: str  # where the configuration came from
    restarts: tuple[int, ...]  # by slot of the current generation: quick deaths in a row
    vacant: tuple[int, ...]  # slots with no process (dead, or waiting for their respawn)


_IpField = Literal["open", "attempted", "succeeded", "exhausted", "retries", "rescued", "udp_open"]
_IP_FIELDS: tuple[_IpField, ...] = (
    "open",
    "attempted",
    "succeeded",
    "exhausted",
    "retries",
    "rescued",
    "udp_open",
)
_TargetField = Literal["open", "recent_closes", "exhausted"]
_TARGET_FIELDS: tuple[_TargetField, ...] = ("open", "recent_closes", "exhausted")


def aggregate(
    views: Sequence[WorkerView],
    *,
    retired: Mapping[str, Any],
    facts: SupervisorFacts,
    time_wait: TimeWaitSample,
    now: float,
) -> Aggregate:
    """Sum what the workers reported into the aggregate every reader is served.

    Args:
        views: the live worker processes, every generation's.
        retired: the summed counters of the workers that are gone.
        facts: the supervisor's own figures.
        time_wait: the latest kernel TIME_WAIT sample.
        now: the supervisor's monotonic clock.

    Returns:
        `supervisor`, `total`, `workers` (by generation and slot, then the vacant slots)
        and `egress`.
    """
    counters: dict[str, Any] = {}
    add_counters(counters, retired)
    gauges: dict[str, Any] = {}
    workers: list[WorkerRow] = []
    restarts = facts.restarts
    for v in sorted(views, key=lambda v: (v.gen, v.slot)):
        add_counters(counters, v.counters)
        add_counters(gauges, v.gauges)
        workers.append(
            {
                "slot": v.slot,
                "gen": v.gen,
                "pid": v.pid,
                "alive": True,
                "last_seen_s": round(now - v.last_seen, 2),
                # By slot index whatever the generation: a draining worker shows the
                # restarts of the slot that replaced it.
                "restarts": restarts[v.slot] if v.slot < len(restarts) else 0,
                "counters": v.counters,
                "gauges": v.gauges,
            }
        )
    for index in facts.vacant:
        workers.append(
            {
                "slot": index,
                "gen": facts.generation,
                "pid": None,
                "alive": False,
                "last_seen_s": None,
                "restarts": restarts[index],
                "counters": {},
                "gauges": {},
            }
        )
    return {
        "supervisor": {
            "pid": facts.pid,
            "generation": facts.generation,
            "reloads": facts.reloads,
            "workers_wanted": len(restarts),
            "uptime_s": round(now - facts.started, 1),
            "config": facts.config,
        },
        "total": {"counters": counters, "gauges": gauges},
        "workers": workers,
        "egress": aggregate_egress(views, time_wait),
        "dns": dns_summary(counters.get("dns", {})),
    }


def latency_percentile(buckets: Mapping[str, int], q: float) -> float | None:
    """The upper bound (ms) of the histogram bucket holding quantile `q` (0..1).

    `buckets`: upper bound in ms as text (or "inf") -> count, as workers report them.
    """
    bounds = sorted((float(b), n) for b, n in buckets.items())
    total = sum(n for _, n in bounds)
    if not total:
        return None
    seen = 0
    for bound, n in bounds:
        seen += n
        if seen >= q * total:
            return None if math.isinf(bound) else bound
    return None


def dns_summary(dns: Mapping[str, Any]) -> DnsSummary:
    """The `dns` part of the aggregate, from the summed `counters.dns`."""
    hits = int(dns.get("hits", 0))
    misses = int(dns.get("misses", 0))
    coalesced = int(dns.get("coalesced", 0))
    asked = hits + misses + coalesced
    latency = dns.get("latency_ms", {})
    return {
        "lookups": int(dns.get("lookups", 0)),
        "hits": hits,
        "misses": misses,
        "coalesced": coalesced,
        "stale": int(dns.get("stale", 0)),
        "failures": dict(dns.get("failures", {})),
        "hit_ratio": round(hits / asked, 4) if asked else None,
        "latency_p50_ms": latency_percentile(latency, 0.5),
        "latency_p99_ms": latency_percentile(latency, 0.99),
    }


def aggregate_egress(
    views: Sequence[WorkerView], time_wait: TimeWaitSample, top: int = 20
) -> EgressSummary:
    """Sum the workers' egress figures per IP and per (IP, target).

    Args:
        views: the live worker processes.
        time_wait: the latest kernel TIME_WAIT sample, given a pressure per pair.
        top: the hottest targets kept.

    Returns:
        The `egress` part of the aggregate.
    """
    ports = max((v.ephemeral_ports for v in views), default=0) or 1
    ips: dict[str, EgressIpRow] = {}
    targets: dict[tuple[str, str], TargetRow] = {}
    for view in views:
        for ip in view.egress_ips:
            row = ips.get(ip["ip"])
            if row is None:
                row = ips[ip["ip"]] = {
                    "ip": ip["ip"],
                    "failed": {},
                    "open": 0,
                    "attempted": 0,
                    "succeeded": 0,
                    "exhausted": 0,
                    "retries": 0,
                    "rescued": 0,
                    "udp_open": 0,
                }
            for f in _IP_FIELDS:
                row[f] += ip.get(f, 0)
            add_counters(row["failed"], ip.get("failed", {}))
        for t in view.egress_targets:
            key = (t["egress_ip"], t["target"])
            trow = targets.get(key)
            if trow is None:
                trow = targets[key] = {
                    "egress_ip": key[0],
                    "target": key[1],
                    "open": 0,
                    "recent_closes": 0,
                    "exhausted": 0,
                    "pressure": 0.0,  # set below, once every worker is summed
                }
            for tf in _TARGET_FIELDS:
                trow[tf] += t.get(tf, 0)
    for trow in targets.values():
        trow["pressure"] = round((trow["open"] + trow["recent_closes"]) / ports, 4)
    hot = sorted(targets.values(), key=lambda r: (r["pressure"], r["exhausted"]), reverse=True)
    return {
        "ephemeral_ports": ports,
        "ips": sorted(ips.values(), key=lambda r: r["ip"]),
        "targets": hot[:top],
        "time_wait": {
            "total": time_wait.total,
            "truncated": time_wait.truncated,
            "by_pair": [
                {"egress_ip": ip, "target": t, "count": n, "pressure": round(n / ports, 4)}
                for ip, t, n in time_wait.by_pair
            ],
        },
    }
