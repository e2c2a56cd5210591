"""A worker's per-customer books: usage per user and per ingress IP, live.

Owns: `Usage` (one account's totals since the worker started), `Meter` (one open
tunnel's or UDP association's place in the books: what of its bytes its accounts and
its `tunnel_usage` lines have already been given), and `Ledger`: opening and closing
meters, folding the open connections' byte counts into their accounts, the
`tunnel_usage` records, refusals by reason, and the report of the accounts that
changed (`socksd.usage` defines its shape; `workers.reporter` sends it).
Must not: touch sockets or count bytes itself: a connection's own counters (moved by
each send and splice result) are read through its `moved()`.

Why fold rather than count per send: the relay already adds each send's result to its
side's `sent`; an account is that plus what its closed tunnels moved, folded in once a
report (every `stats.interval`) and at close. The data path pays nothing per send;
a report costs one pass over the open connections, as the idle sweep does.

Bounded memory: accounts exist for users the config knows (and the tunnels without a
user) and for the host's own IPs a client came in on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from socksd.usage import FIELDS, NO_USER, Report


class Usage:
    """One user's or one ingress IP's totals in this worker (FIELDS, then refusals)."""

    __slots__ = ("name", *FIELDS, "refused")

    def __init__(self, name: str) -> None:
        self.name = name
        self.tunnels_opened = self.udp_opened = self.open = 0
        self.bytes_up = self.bytes_down = 0
        self.udp_datagrams_up = self.udp_datagrams_down = 0
        self.udp_bytes_up = self.udp_bytes_down = 0
        self.refused: dict[str, int] = {}

    def row(self) -> list[Any]:
        return [*(getattr(self, f) for f in FIELDS), dict(self.refused)]


Moved = tuple[int, int, int, int]  # bytes up, bytes down, datagrams up, datagrams down


class Metered(Protocol):
    """An open connection with a meter: a relay or a UDP association."""

    meter: Meter | None

    def moved(self) -> Moved: ...


class Meter:
    """One tunnel's or association's place in the books: `folded`, what of `moved()`
    its two accounts have; `recorded`, what its `tunnel_usage` lines reported;
    `due`, the loop time of its next record."""

    __slots__ = ("user", "ingress", "udp", "folded", "recorded", "due", "records")

    def __init__(self, user: Usage, ingress: Usage, udp: bool, due: float) -> None:
        self.user = user
        self.ingress = ingress
        self.udp = udp
        self.folded: Moved = (0, 0, 0, 0)
        self.recorded: Moved = (0, 0, 0, 0)
        self.due = due
        self.records = 0


class Ledger:
    """The worker's accounts, and which of them changed since the last report."""

    def __init__(self, interval: float) -> None:
        self.interval = interval  # accounting.interval: between two tunnel_usage lines
        self.users: dict[str, Usage] = {}
        self.ingress: dict[str, Usage] = {}
        self._dirty: set[Usage] = set()  # accounts changed since the last report

    # -- connections ------------------------------------------------------------------

    def open(self, user: str | None, ingress_ip: str, now: float, udp: bool) -> Meter:
        """A tunnel (or, `udp`, an association) opened for `user` on `ingress_ip`."""
        name = NO_USER if user is None else user
        u = self.users.get(name) or self._account(self.users, name)
        i = self.ingress.get(ingress_ip) or self._account(self.ingress, ingress_ip)
        if udp:
            u.udp_opened += 1
            i.udp_opened += 1
        else:
            u.tunnels_opened += 1
            i.tunnels_opened += 1
        u.open += 1
        i.open += 1
        dirty = self._dirty
        dirty.add(u)
        dirty.add(i)
        return Meter(u, i, udp, now + self.interval)

    def close(self, meter: Meter, moved: Moved) -> tuple[int, int]:
        """The connection closed having moved `moved`: its last bytes go to its
        accounts. Returns the bytes (up, down) no `tunnel_usage` line reported."""
        self._fold(meter, moved)
        meter.user.open -= 1
        meter.ingress.open -= 1
        rec = meter.recorded
        return moved[0] - rec[0], moved[1] - rec[1]

    def fold(self, conns: Iterable[object]) -> None:
        """Bring the accounts up to date with what the open connections moved."""
        for conn in conns:
            meter = getattr(conn, "meter", None)
            if meter is not None:
                self._fold(meter, conn.moved())  # type: ignore[attr-defined]

    def _fold(self, meter: Meter, moved: Moved) -> None:
        was = meter.folded
        if moved == was:
            return
        up = moved[0] - was[0]
        down = moved[1] - was[1]
        dg_up = moved[2] - was[2]
        dg_down = moved[3] - was[3]
        meter.folded = moved
        for usage in (meter.user, meter.ingress):
            self._dirty.add(usage)
            if meter.udp:
                usage.udp_bytes_up += up
                usage.udp_bytes_down += down
                usage.udp_datagrams_up += dg_up
                usage.udp_datagrams_down += dg_down
            else:
                usage.bytes_up += up
                usage.bytes_down += down

    @staticmethod
    def _account(accounts: dict[str, Usage], name: str) -> Usage:
        usage = accounts[name] = Usage(name)
        return usage

    def refused(self, reason: str, ingress_ip: str, user: str | None) -> None:
        """A request (or a known user's login) refused, by reason, on the ingress IP's
        account and on `user`'s (None: no user account to charge: NO_USER is the
        account of requests without a user). The caller never passes a user name the
        config does not know (bounded memory)."""
        pairs = [(self.ingress, ingress_ip)]
        if user is not None:
            pairs.append((self.users, user))
        for accounts, name in pairs:
            usage = accounts.get(name) or self._account(accounts, name)
            usage.refused[reason] = usage.refused.get(reason, 0) + 1
            self._dirty.add(usage)

    # -- records and reports ---------------------------------------------------------------

    def record(self, meter: Meter, moved: Moved, now: float) -> dict[str, int]:
        """The fields of a due `tunnel_usage` line: what moved since the previous one
        (`record` numbers them from 1). The next is due one interval later."""
        rec = meter.recorded
        meter.recorded = moved
        meter.records += 1
        meter.due = max(meter.due + self.interval, now)
        fields = {
            "record": meter.records,
            "bytes_up": moved[0] - rec[0],
            "bytes_down": moved[1] - rec[1],
        }
        if meter.udp:
            fields["datagrams_up"] = moved[2] - rec[2]
            fields["datagrams_down"] = moved[3] - rec[3]
        return fields

    @property
    def changed(self) -> bool:
        return bool(self._dirty)

    def report(self) -> Report:
        """The accounts changed since the last report, with their totals; the next
        report starts from nothing changed."""
        users: dict[str, list[Any]] = {}
        ingress: dict[str, list[Any]] = {}
        for usage in self._dirty:
            into = users if self.users.get(usage.name) is usage else ingress
            into[usage.name] = usage.row()
        self._dirty = set()
        return {"users": users, "ingress": ingress}
