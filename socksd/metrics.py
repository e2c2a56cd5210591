"""Prometheus text exposition (format 0.0.4) of the supervisor's aggregate stats.

Owns: metric names, HELP/TYPE text, label escaping and number formatting for
`/metrics`; `render()` turns the aggregate dict into the exposition body.
Must not: serve HTTP, read stats pipes or /proc, or depend on prometheus_client.

Names are `socksd_*`; counters end in `_total` (in 0.0.4 the TYPE line names the
sample, `_total` included). Every family is declared once, up front, so it gets
exactly one HELP and one TYPE line however many samples it has, and appears (with no
samples) even when the aggregate is empty. Per-worker series carry only
`worker="<slot>"`; counters restart from zero when a slot's process is replaced, which
Prometheus' `rate()` treats as an ordinary counter reset.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "socksd_"


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: name without the `socksd_` prefix, type and HELP text."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str


# Per-worker counters: aggregate key in `counters` -> family.
_WORKER_COUNTERS: tuple[tuple[str, Family], ...] = (
    ("accepted", Family("accepted_total", "counter", "Client connections accepted.")),
    ("tunnels_opened", Family("tunnels_opened_total", "counter", "Tunnels established.")),
    ("tunnels_closed", Family("tunnels_closed_total", "counter", "Tunnels closed.")),
    ("bytes_up", Family("bytes_up_total", "counter", "Bytes relayed client to target.")),
    ("bytes_down", Family("bytes_down_total", "counter", "Bytes relayed target to client.")),
    (
        "udp_datagrams_up",
        Family("udp_datagrams_up_total", "counter", "UDP datagrams relayed client to target."),
    ),
    (
        "udp_datagrams_down",
        Family("udp_datagrams_down_total", "counter", "UDP datagrams relayed target to client."),
    ),
    ("udp_bytes_up", Family("udp_bytes_up_total", "counter", "UDP payload bytes, up.")),
    ("udp_bytes_down", Family("udp_bytes_down_total", "counter", "UDP payload bytes, down.")),
    (
        "retries",
        Family(
            "egress_retries_total",
            "counter",
            "Egress connect() attempts repeated after EADDRNOTAVAIL.",
        ),
    ),
    (
        "rescued",
        Family(
            "egress_rescued_total",
            "counter",
            "Tunnels that connected after at least one egress retry.",
        ),
    ),
    (
        "exhausted",
        Family(
            "egress_exhausted_total",
            "counter",
            "Tunnels refused because no 4-tuple was free for (egress IP, target).",
        ),
    ),
    (
        "dropped_lines",
        Family(
            "stats_dropped_lines_total",
            "counter",
            "Stats lines the worker dropped because its pipe was full.",
        ),
    ),
    # A worker's DNS figures, under `counters.dns` (a dotted key is a path).
    ("dns.lookups", Family("dns_lookups_total", "counter", "Name lookups sent to the resolver.")),
    ("dns.hits", Family("dns_cache_hits_total", "counter", "Names answered from the cache.")),
    ("dns.misses", Family("dns_cache_misses_total", "counter", "Names not in the cache.")),
    (
        "dns.coalesced",
        Family("dns_coalesced_total", "counter", "Names asked while their lookup ran."),
    ),
    (
        "dns.stale",
        Family("dns_stale_answers_total", "counter", "Expired answers served (RFC 8767)."),
    ),
)

# Per-worker counters held as {label value: count}: key -> (label name, family).
_WORKER_LABELLED: tuple[tuple[str, str, Family], ...] = (
    (
        "handshake_failures",
        "reason",
        Family("handshake_failures_total", "counter", "SOCKS handshakes that failed, by reason."),
    ),
    (
        "refused",
        "reason",
        Family(
            "refused_total",
            "counter",
            "Clients and requests refused by an access rule or a limit, by reason.",
        ),
    ),
    (
        "udp_dropped",
        "reason",
        Family("udp_dropped_total", "counter", "UDP datagrams dropped, by reason."),
    ),
    (
        "replies",
        "code",
        Family("replies_total", "counter", "SOCKS5 replies sent, by reply code (RFC 1928 6)."),
    ),
    (
        "egress_errors",
        "kind",
        Family("egress_errors_total", "counter", "Egress socket errors, by call and errno."),
    ),
)

_DNS_FAILURES = Family("dns_failures_total", "counter", "Name lookups that failed, by reason.")
_DNS_LATENCY = Family("dns_lookup_seconds", "histogram", "Time a name lookup took.")

_WORKER_GAUGES: tuple[tuple[str, Family], ...] = (
    ("open_tunnels", Family("open_tunnels", "gauge", "Tunnels currently relaying.")),
    ("open_sessions", Family("open_sessions", "gauge", "Client sessions currently open.")),
)

_WORKER_UP = Family("worker_up", "gauge", "1 if the worker process is alive, else 0.")
_WORKER_RESTARTS = Family("worker_restarts_total", "counter", "Times the slot was respawned.")

_SUPERVISOR: tuple[tuple[str, Family], ...] = (
    ("generation", Family("generation", "gauge", "Worker process generation (1 until restart).")),
    ("reloads", Family("reloads_total", "counter", "Configs applied in place since start.")),
    ("workers_wanted", Family("workers_wanted", "gauge", "Worker slots the supervisor keeps.")),
    ("uptime_s", Family("uptime_seconds", "gauge", "Seconds since the supervisor started.")),
)
_EPHEMERAL = Family(
    "ephemeral_ports", "gauge", "Usable ports in ip_local_port_range (P per egress IP, target)."
)

_IP_FIELDS: tuple[tuple[str, Family], ...] = (
    ("open", Family("egress_open_sockets", "gauge", "Open upstream sockets per egress IP.")),
    (
        "udp_open",
        Family(
            "egress_udp_sockets",
            "gauge",
            "UDP ASSOCIATE sockets per egress IP (each holds one local UDP port).",
        ),
    ),
    (
        "attempted",
        Family(
            "egress_connects_attempted_total",
            "counter",
            "Upstream connects attempted per egress IP.",
        ),
    ),
    (
        "succeeded",
        Family(
            "egress_connects_succeeded_total",
            "counter",
            "Upstream connects that succeeded per egress IP.",
        ),
    ),
    (
        "exhausted",
        Family(
            "egress_ip_exhausted_total",
            "counter",
            "Tunnels refused for want of a free 4-tuple, per egress IP.",
        ),
    ),
    (
        "retries",
        Family(
            "egress_ip_retries_total",
            "counter",
            "Connect retries after EADDRNOTAVAIL, per egress IP.",
        ),
    ),
    (
        "rescued",
        Family(
            "egress_ip_rescued_total",
            "counter",
            "Tunnels rescued by a connect retry, per egress IP.",
        ),
    ),
)
_IP_FAILURES = Family(
    "egress_connect_failures_total", "counter", "Upstream connect failures per egress IP, by errno."
)

_TARGET_FIELDS: tuple[tuple[str, Family], ...] = (
    (
        "open",
        Family(
            "egress_target_open_sockets", "gauge", "Open upstream sockets per (egress IP, target)."
        ),
    ),
    (
        "recent_closes",
        Family(
            "egress_target_recent_closes",
            "gauge",
            "Sockets closed within the reuse window per (egress IP, target).",
        ),
    ),
    (
        "pressure",
        Family(
            "egress_target_pressure",
            "gauge",
            "(open + recent closes) / ephemeral ports per (egress IP, target).",
        ),
    ),
    (
        "exhausted",
        Family(
            "egress_target_exhausted_total",
            "counter",
            "Tunnels refused for want of a free 4-tuple per (egress IP, target).",
        ),
    ),
)

_TW_TOTAL = Family("time_wait_sockets", "gauge", "TIME_WAIT sockets seen in the kernel's table.")
_TW_PAIR = Family(
    "time_wait_pair_sockets", "gauge", "TIME_WAIT sockets per (egress IP, target), hottest pairs."
)
_TW_PRESSURE = Family(
    "time_wait_pair_pressure",
    "gauge",
    "TIME_WAIT sockets / ephemeral ports per (egress IP, target).",
)

# Per-customer series (metrics.per_user / metrics.per_ingress): declared only when on.
_USER_BYTES = Family(
    "user_bytes_total", "counter", "Payload bytes (TCP and UDP) per user, by direction."
)
_USER_OPEN = Family("user_tunnels_open", "gauge", "Tunnels and UDP associations open per user.")
_USER_OPENED = Family(
    "user_tunnels_total", "counter", "Tunnels and UDP associations opened per user."
)
_USER_REFUSED = Family("user_refused_total", "counter", "Requests refused per user, by reason.")
_OVERFLOW_USERS = Family(
    "user_series_overflow_users",
    "gauge",
    "Users over metrics.max_users: no series of their own, summed in user_overflow_*.",
)
_OVERFLOW_BYTES = Family(
    "user_overflow_bytes_total", "counter", "Payload bytes of the users over metrics.max_users."
)
_INGRESS_BYTES = Family(
    "ingress_bytes_total", "counter", "Payload bytes (TCP and UDP) per ingress IP, by direction."
)
_INGRESS_OPEN = Family(
    "ingress_tunnels_open", "gauge", "Tunnels and UDP associations open per ingress IP."
)
_INGRESS_OPENED = Family(
    "ingress_tunnels_total", "counter", "Tunnels and UDP associations opened per ingress IP."
)
USER_FAMILIES = (
    _USER_BYTES,
    _USER_OPEN,
    _USER_OPENED,
    _USER_REFUSED,
    _OVERFLOW_USERS,
    _OVERFLOW_BYTES,
)
INGRESS_FAMILIES = (_INGRESS_BYTES, _INGRESS_OPEN, _INGRESS_OPENED)

FAMILIES: tuple[Family, ...] = (
    *(f for _, f in _SUPERVISOR),
    _EPHEMERAL,
    *(f for _, f in _WORKER_COUNTERS),
    *(f for _, _, f in _WORKER_LABELLED),
    *(f for _, f in _WORKER_GAUGES),
    _DNS_FAILURES,
    _DNS_LATENCY,
    _WORKER_UP,
    _WORKER_RESTARTS,
    *(f for _, f in _IP_FIELDS),
    _IP_FAILURES,
    *(f for _, f in _TARGET_FIELDS),
    _TW_TOTAL,
    _TW_PAIR,
    _TW_PRESSURE,
)


def escape_label_value(value: str) -> str:
    """Escape a label value as the 0.0.4 text format requires: `\\`, `"` and newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: Any) -> str:
    """Format a sample value: integers exactly, floats by repr, NaN and +/-Inf by name.

    Raises:
        TypeError: the value is not a number (a bug in whoever built the aggregate).
    """
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    raise TypeError(f"metric value must be a number, not {type(value).__name__}: {value!r}")


class _Exposition:
    """Samples collected per declared family, written out in declaration order."""

    __slots__ = ("_samples",)

    def __init__(self, families: Iterable[Family]) -> None:
        self._samples: dict[Family, list[str]] = {f: [] for f in families}

    def add(self, family: Family, labels: Mapping[str, Any], value: Any, suffix: str = "") -> None:
        """Add one sample (`suffix`: a histogram's _bucket, _sum or _count); a missing
        (None) value is omitted, not rendered as 0."""
        if value is None:
            return
        name = PREFIX + family.name + suffix
        if labels:
            inner = ",".join(f'{k}="{escape_label_value(str(v))}"' for k, v in labels.items())
            name = f"{name}{{{inner}}}"
        self._samples[family].append(f"{name} {format_value(value)}")

    def text(self) -> str:
        out: list[str] = []
        for family, lines in self._samples.items():
            out.append(f"# HELP {PREFIX}{family.name} {_escape_help(family.help)}")
            out.append(f"# TYPE {PREFIX}{family.name} {family.kind}")
            out.extend(lines)
        return "\n".join(out) + "\n"


def _dig(mapping: Mapping[str, Any], key: str) -> Any:
    """mapping["a"]["b"] for "a.b"; None where a step is missing."""
    for step in key.split("."):
        mapping = _map(mapping).get(step)  # type: ignore[assignment]
    return mapping


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _one_per_slot(workers: list[Any]) -> list[Mapping[str, Any]]:
    """Keep the newest generation of each slot, in slot order.

    During a reload the old generation drains beside the new one on the same slot;
    two series with the same `worker` label would be a duplicate the scraper rejects.
    """
    newest: dict[str, Mapping[str, Any]] = {}
    for item in workers:
        w = _map(item)
        slot = str(w.get("slot"))
        kept = newest.get(slot)
        if kept is None or (w.get("gen") or 0) >= (kept.get("gen") or 0):
            newest[slot] = w
    return [newest[s] for s in sorted(newest, key=lambda s: (len(s), s))]


def _add_dns(exp: _Exposition, labels: Mapping[str, Any], dns: Mapping[str, Any]) -> None:
    """One worker's DNS figures; the latency as a cumulative histogram in seconds."""
    if not dns:
        return
    for reason, count in sorted(_map(dns.get("failures")).items()):
        exp.add(_DNS_FAILURES, {**labels, "reason": reason}, count)
    buckets = sorted(
        (float(bound), n) for bound, n in _map(dns.get("latency_ms")).items() if bound != "inf"
    )
    total = sum(_map(dns.get("latency_ms")).values())
    seen = 0
    for bound, n in buckets:
        seen += n
        exp.add(_DNS_LATENCY, {**labels, "le": format_value(bound / 1000)}, seen, "_bucket")
    exp.add(_DNS_LATENCY, {**labels, "le": "+Inf"}, total, "_bucket")
    exp.add(_DNS_LATENCY, labels, float(dns.get("latency_s_total", 0.0)), "_sum")
    exp.add(_DNS_LATENCY, labels, total, "_count")


def _directions(row: Mapping[str, Any]) -> tuple[tuple[str, int], tuple[str, int]]:
    return (
        ("up", row["bytes_up"] + row["udp_bytes_up"]),
        ("down", row["bytes_down"] + row["udp_bytes_down"]),
    )


def _add_usage(exp: _Exposition, usage: Mapping[str, Any]) -> None:
    """The per-user and per-ingress series (`Supervisor.metrics_usage()`'s rows)."""
    for row in _list(usage.get("users")):
        labels = {"user": row["user"] or ""}
        for direction, n in _directions(row):
            exp.add(_USER_BYTES, {**labels, "direction": direction}, n)
        exp.add(_USER_OPEN, labels, row["open"])
        exp.add(_USER_OPENED, labels, row["tunnels_opened"] + row["udp_opened"])
        for reason, n in row["refused"].items():
            exp.add(_USER_REFUSED, {**labels, "reason": reason}, n)
    overflow = usage.get("users_overflow")
    if overflow is not None:
        exp.add(_OVERFLOW_USERS, {}, overflow["users"])
        for direction, n in _directions(overflow):
            exp.add(_OVERFLOW_BYTES, {"direction": direction}, n)
    for row in _list(usage.get("ingress")):
        labels = {"ingress_ip": row["ingress_ip"]}
        for direction, n in _directions(row):
            exp.add(_INGRESS_BYTES, {**labels, "direction": direction}, n)
        exp.add(_INGRESS_OPEN, labels, row["open"])
        exp.add(_INGRESS_OPENED, labels, row["tunnels_opened"] + row["udp_opened"])


def render(aggregate: Mapping[str, Any], usage: Mapping[str, Any] | None = None) -> str:
    """Render the supervisor's aggregate stats as a Prometheus 0.0.4 text body.

    Args:
        aggregate: `{"supervisor", "total", "workers", "egress"}` as the supervisor
            builds it. Missing sections, keys or None values yield no sample (the
            family's HELP/TYPE is still written). `total` is not rendered: it is the
            sum of the per-worker series, which PromQL's `sum()` gives without
            double counting.
        usage: the per-user (`users`, `users_overflow`) and per-ingress (`ingress`)
            rows when metrics.per_user / per_ingress are on; None: neither is, and
            their families are not declared at all.

    Returns:
        The exposition text, ending in a newline; serve it with `CONTENT_TYPE`.

    Raises:
        TypeError: a sample value is not a number.
    """
    families = FAMILIES
    if usage is not None:
        families += USER_FAMILIES if "users" in usage else ()
        families += INGRESS_FAMILIES if "ingress" in usage else ()
    exp = _Exposition(families)

    supervisor = _map(aggregate.get("supervisor"))
    for key, family in _SUPERVISOR:
        exp.add(family, {}, supervisor.get(key))
    egress = _map(aggregate.get("egress"))
    exp.add(_EPHEMERAL, {}, egress.get("ephemeral_ports"))

    for w in _one_per_slot(_list(aggregate.get("workers"))):
        labels = {"worker": w.get("slot")}
        counters = _map(w.get("counters"))
        for key, family in _WORKER_COUNTERS:
            exp.add(family, labels, _dig(counters, key))
        for key, label, family in _WORKER_LABELLED:
            for label_value, count in sorted(_map(counters.get(key)).items()):
                exp.add(family, {**labels, label: label_value}, count)
        gauges = _map(w.get("gauges"))
        for key, family in _WORKER_GAUGES:
            exp.add(family, labels, gauges.get(key))
        _add_dns(exp, labels, _map(counters.get("dns")))
        alive = w.get("alive")
        exp.add(_WORKER_UP, labels, None if alive is None else int(bool(alive)))
        exp.add(_WORKER_RESTARTS, labels, w.get("restarts"))

    for row in _list(egress.get("ips")):
        ip = _map(row)
        labels = {"egress_ip": ip.get("ip")}
        for key, family in _IP_FIELDS:
            exp.add(family, labels, ip.get(key))
        for errno_name, count in sorted(_map(ip.get("failed")).items()):
            exp.add(_IP_FAILURES, {**labels, "errno": errno_name}, count)

    for row in _list(egress.get("targets")):
        t = _map(row)
        labels = {"egress_ip": t.get("egress_ip"), "target": t.get("target")}
        for key, family in _TARGET_FIELDS:
            exp.add(family, labels, t.get(key))

    time_wait = _map(egress.get("time_wait"))
    exp.add(_TW_TOTAL, {}, time_wait.get("total"))
    for row in _list(time_wait.get("by_pair")):
        p = _map(row)
        labels = {"egress_ip": p.get("egress_ip"), "target": p.get("target")}
        exp.add(_TW_PAIR, labels, p.get("count"))
        exp.add(_TW_PRESSURE, labels, p.get("pressure"))

    if usage is not None:
        _add_usage(exp, usage)
    return exp.text()
