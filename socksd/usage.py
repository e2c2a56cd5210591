"""Per-customer usage: what workers report per user and per ingress IP, and its sums.

Owns: the figures of one account (`FIELDS`, in wire order), the usage report a
worker sends over its channel (`socksd.channel.USAGE`), the supervisor's `UsageBook`
(each live worker's latest report, plus the sums of the workers that are gone), and
the rows of `socksd stats --users` / `--ingress` with their text tables.
Must not: count (workers/accounting.py does), touch fds or read clocks.

A report carries cumulative figures (totals since the worker started) for the accounts
that changed since the worker's previous report, so the book replaces an account's
row rather than adding to it: a report that is skipped (the channel still busy with the
previous one) loses nothing, the next one carries the totals. A worker killed with -9
loses what moved since its last report (at most `stats.interval` of its traffic);
the book keeps its last figures, as for a worker that exited cleanly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# An account's figures, in the order a report's rows carry them (then `refused`).
FIELDS = (
    "tunnels_opened",  # CONNECT and BIND tunnels
    "udp_opened",  # UDP associations
    "open",  # tunnels and associations open now (a gauge)
    "bytes_up",  # TCP payload, client to target
    "bytes_down",  # TCP payload, target to client
    "udp_datagrams_up",
    "udp_datagrams_down",
    "udp_bytes_up",
    "udp_bytes_down",
)
_OPEN = FIELDS.index("open")
NO_USER = ""  # the account of tunnels without a user (auth.method = "none")

Row = list[Any]  # the FIELDS' values, then {reason: count} of requests refused
Report = dict[str, dict[str, Row]]  # {"users": {name: row}, "ingress": {ip: row}}
KINDS = ("users", "ingress")


def _add(into: dict[str, Row], rows: Mapping[str, Row], *, gauges: bool = True) -> None:
    """Sum `rows` into `into`, name by name; `gauges` False leaves `open` out (a
    worker that is gone holds nothing open)."""
    n = len(FIELDS)
    for name, row in rows.items():
        have = into.get(name)
        if have is None:
            have = into[name] = [0] * n + [{}]
        for i in range(n):
            if gauges or i != _OPEN:
                have[i] += row[i]
        refused = have[n]
        for reason, count in row[n].items():
            refused[reason] = refused.get(reason, 0) + count


def summed(rows: Iterable[Row]) -> Row:
    """The sum of several accounts' rows (the users over metrics.max_users)."""
    out: dict[str, Row] = {}
    for row in rows:
        _add(out, {"": row})
    return out.get("", [0] * len(FIELDS) + [{}])


class UsageBook:
    """The supervisor's per-customer figures: exact as of each worker's last report."""

    def __init__(self) -> None:
        self._live: dict[int, Report] = {}  # worker pid -> its accounts' latest rows
        self._gone: Report = {kind: {} for kind in KINDS}
        # Every user name in the order first reported: /metrics keeps a stable set of
        # series under metrics.max_users (a user does not lose its series to another).
        self.seen_users: dict[str, None] = {}

    def feed(self, pid: int, report: Mapping[str, Mapping[str, Row]]) -> None:
        """Take a worker's report: its rows replace that worker's previous ones."""
        mine = self._live.setdefault(pid, {kind: {} for kind in KINDS})
        for kind in KINDS:
            rows = report.get(kind, {})
            mine[kind].update(rows)
            if kind == "users":
                for name in rows:
                    self.seen_users.setdefault(name, None)

    def retire(self, pid: int) -> None:
        """Worker `pid` is gone: its last figures join the sums of the gone ones."""
        mine = self._live.pop(pid, None)
        if mine is not None:
            for kind in KINDS:
                _add(self._gone[kind], mine[kind], gauges=False)

    def totals(self, kind: str) -> dict[str, Row]:
        """Every account of `kind` ("users" or "ingress"), summed over all workers."""
        out: dict[str, Row] = {}
        _add(out, self._gone[kind])
        for report in self._live.values():
            _add(out, report[kind])
        return out


def as_dict(name: str, row: Row, key: str) -> dict[str, Any]:
    """One account as a JSON object: `key` (user / ingress_ip), the fields, the sum of
    both directions' TCP and UDP bytes, and the refusals by reason."""
    out: dict[str, Any] = {key: name}
    out.update(zip(FIELDS, row, strict=False))
    out["bytes_total"] = row[3] + row[4] + row[7] + row[8]
    out["refused"] = dict(sorted(row[len(FIELDS)].items()))
    return out


def user_rows(totals: Mapping[str, Row]) -> list[dict[str, Any]]:
    """`socksd stats --users --json`: one object per user, most bytes first; the
    tunnels without a user have `user` null."""
    rows = [as_dict(name, row, "user") for name, row in totals.items()]
    for r in rows:
        if r["user"] == NO_USER:
            r["user"] = None
    rows.sort(key=lambda r: (-r["bytes_total"], r["user"] or ""))
    return rows


def ingress_rows(
    totals: Mapping[str, Row],
    egress_of: Mapping[str, str],
    egress: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """`socksd stats --ingress --json`: one object per ingress IP, by IP, with the port
    pressure of the egress IP its tunnels leave from.

    Args:
        totals: the summed ingress accounts.
        egress_of: ingress IP -> the egress IP its tunnels use (itself by default).
        egress: the aggregate's `egress` section (per-IP figures, hottest targets and
            the TIME_WAIT sample).
    """
    ips = {row["ip"]: row for row in egress.get("ips", [])}
    hottest: dict[str, dict[str, Any]] = {}
    for t in egress.get("targets", []):  # hottest first: keep each IP's first
        hottest.setdefault(t["egress_ip"], t)
    time_wait: dict[str, int] = {}
    for pair in egress.get("time_wait", {}).get("by_pair", []):
        time_wait[pair["egress_ip"]] = time_wait.get(pair["egress_ip"], 0) + pair["count"]
    rows = []
    for name in sorted(totals):
        row = as_dict(name, totals[name], "ingress_ip")
        out_ip = egress_of.get(name, name)
        ip = ips.get(out_ip, {})
        hot = hottest.get(out_ip)
        row["egress"] = {
            "ip": out_ip,
            "open": ip.get("open", 0),
            "exhausted": ip.get("exhausted", 0),
            "retries": ip.get("retries", 0),
            "time_wait": time_wait.get(out_ip, 0),
            "hottest_target": None if hot is None else hot["target"],
            "pressure": 0.0 if hot is None else hot["pressure"],
        }
        rows.append(row)
    return rows


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _refused(refused: Mapping[str, int]) -> str:
    return " ".join(f"{reason}={n}" for reason, n in refused.items()) or "-"


def format_users(rows: Iterable[Mapping[str, Any]]) -> str:
    """The human table of `socksd stats --users`."""
    lines = [
        f"{'user':<24} {'open':>6} {'tunnels':>9} {'udp':>6} {'bytes up':>12} "
        f"{'bytes down':>12} {'udp up':>10} {'udp down':>10}  refused"
    ]
    for r in rows:
        lines.append(
            f"{r['user'] or '-':<24} {r['open']:>6} {r['tunnels_opened']:>9} "
            f"{r['udp_opened']:>6} {_size(r['bytes_up']):>12} {_size(r['bytes_down']):>12} "
            f"{_size(r['udp_bytes_up']):>10} {_size(r['udp_bytes_down']):>10}  "
            f"{_refused(r['refused'])}"
        )
    return "\n".join(lines)


def format_ingress(rows: Iterable[Mapping[str, Any]]) -> str:
    """The human table of `socksd stats --ingress`."""
    lines = [
        f"{'ingress ip':<28} {'open':>6} {'tunnels':>9} {'bytes up':>12} {'bytes down':>12} "
        f"{'egress ip':<28} {'exhausted':>9} {'TIME_WAIT':>9} {'pressure':>8}  hottest target"
    ]
    for r in rows:
        e = r["egress"]
        up = r["bytes_up"] + r["udp_bytes_up"]
        down = r["bytes_down"] + r["udp_bytes_down"]
        lines.append(
            f"{r['ingress_ip']:<28} {r['open']:>6} {r['tunnels_opened'] + r['udp_opened']:>9} "
            f"{_size(up):>12} {_size(down):>12} {e['ip']:<28} {e['exhausted']:>9} "
            f"{e['time_wait']:>9} {e['pressure']:>8.1%}  {e['hottest_target'] or '-'}"
        )
    return "\n".join(lines)


def format_tunnels(rows: Iterable[Mapping[str, Any]]) -> str:
    """The human table of `socksd tunnels`."""
    lines = [
        f"{'conn':<14} {'user':<16} {'client':<22} {'ingress':<16} {'target':<32} "
        f"{'egress':<22} {'age s':>8} {'bytes up':>12} {'bytes down':>12}"
    ]
    for t in rows:
        lines.append(
            f"{t['conn']:<14} {t['user'] or '-':<16} {t['client']:<22} {t['ingress_ip']:<16} "
            f"{t['target']:<32} {t['egress'] or '-':<22} {t['age_s']:>8.1f} "
            f"{_size(t['bytes_up']):>12} {_size(t['bytes_down']):>12}"
        )
    return "\n".join(lines)
