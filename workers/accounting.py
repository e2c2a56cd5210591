"""A worker's per-customer books: usage per user and per ingress IP, live.

Owns: `Usage` (what one user's or ingress IP's closed tunnels and associations moved,
and its refusals), `Ledger` (the accounts; a closing connection's bytes; the report of
the accounts whose figures changed, open connections included; when a long
connection's `tunnel_usage` record is due and what it says), in the shape
`socksd.usage` defines; logging a due record (`workers.events` spells the line).
Must not: touch sockets or count bytes itself: a connection's own counters (moved by
each send and splice result) are read through its `moved()`; send anything
(`workers.reporter` does).

Why nothing happens at open and little at close: an account's live figures are its
closed connections' totals plus what its open ones moved so far, summed when a report
is made (every `stats.interval`: one pass over the open connections, as the idle sweep
makes). A tunnel pays one call at close (two dict look-ups and a few additions) and no
syscall; the first version, with a meter object per tunnel and counts at open, cost
~11,700 instructions more per tunnel (callgrind), this one ~3,000.

Bounded memory: accounts exist for users the config knows (and the tunnels without a
user) and for the host's own IPs a client came in on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from socksd.usage import FIELDS, NO_USER, Report
from workers.events import tunnel_usage

Moved = tuple[int, int, int, int]  # bytes up, bytes down, datagrams up, datagrams down
# A connection's last `tunnel_usage` record: what it had moved then, its number, and
# the loop time it was due.
Recorded = tuple[int, int, int, int, int, float]
# What a connection was admitted on (socksd.revocation.Admitted): [2] ingress, [3] user.
_INGRESS, _USER = 2, 3


class Usage:
    """One user's or ingress IP's closed connections' totals, and its refusals."""

    __slots__ = (
        "name",
        "tunnels",
        "associations",
        "bytes_up",
        "bytes_down",
        "udp_datagrams_up",
        "udp_datagrams_down",
        "udp_bytes_up",
        "udp_bytes_down",
        "refused",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.tunnels = self.associations = 0  # closed ones
        self.bytes_up = self.bytes_down = 0
        self.udp_datagrams_up = self.udp_datagrams_down = 0
        self.udp_bytes_up = self.udp_bytes_down = 0
        self.refused: dict[str, int] = {}

    def row(self, live: list[int] | None) -> list[Any]:
        """The FIELDS' values (then the refusals), with `live`: the open connections'
        [tunnels, associations, bytes up, down, datagrams up, down, udp bytes up, down]."""
        lv = live or [0] * 8
        return [
            self.tunnels + lv[0],
            self.associations + lv[1],
            lv[0] + lv[1],
            self.bytes_up + lv[2],
            self.bytes_down + lv[3],
            self.udp_datagrams_up + lv[4],
            self.udp_datagrams_down + lv[5],
            self.udp_bytes_up + lv[6],
            self.udp_bytes_down + lv[7],
            dict(self.refused),
        ]


assert len(FIELDS) == 9  # Usage.row() writes them in this order


def record_due(ledger: Ledger, conn: Any, log: Any, now: float) -> None:
    """`conn` (a relay or an association) owes a record: its `tunnel_usage` line, if
    anything moved since the previous one, logged with `log` (its bound logger)."""
    fields, conn.recorded = ledger.record(conn.moved(), conn.recorded, conn.started, now, conn.udp)
    if fields is not None:
        tunnel_usage(log, conn.started, now, fields)


class Ledger:
    """The worker's accounts; which changed since the last report."""

    def __init__(self, interval: float) -> None:
        self.interval = interval  # accounting.interval: between two tunnel_usage lines
        self.users: dict[str, Usage] = {}
        self.ingress: dict[str, Usage] = {}
        self._dirty: set[Usage] = set()  # closed a connection or refused since the report

    def _account(self, accounts: dict[str, Usage], name: str) -> Usage:
        usage = accounts.get(name)
        if usage is None:
            usage = accounts[name] = Usage(name)
        return usage

    # -- connections ------------------------------------------------------------------

    def closed(
        self, admitted: tuple[Any, ...], udp: bool, moved: Moved, recorded: Recorded | None
    ) -> tuple[int, ...] | None:
        """A tunnel (`udp`: an association) admitted on `admitted` closed having moved
        `moved`. Returns what its `tunnel_usage` lines did not report: bytes (up,
        down), and for an association datagrams (up, down) too; None when it had none
        (then its totals are all unreported)."""
        user = admitted[_USER]
        name = NO_USER if user is None else user
        ingress = admitted[_INGRESS]
        # .get() first: the account exists almost always, and this skips a call.
        u = self.users.get(name) or self._account(self.users, name)
        i = self.ingress.get(ingress) or self._account(self.ingress, ingress)
        up, down = moved[0], moved[1]
        if udp:
            for usage in (u, i):
                usage.associations += 1
                usage.udp_bytes_up += up
                usage.udp_bytes_down += down
                usage.udp_datagrams_up += moved[2]
                usage.udp_datagrams_down += moved[3]
        else:
            u.tunnels += 1
            u.bytes_up += up
            u.bytes_down += down
            i.tunnels += 1
            i.bytes_up += up
            i.bytes_down += down
        dirty = self._dirty
        dirty.add(u)
        dirty.add(i)
        if recorded is None or recorded[4] == 0:
            return None
        if udp:
            return (
                up - recorded[0],
                down - recorded[1],
                moved[2] - recorded[2],
                moved[3] - recorded[3],
            )
        return up - recorded[0], down - recorded[1]

    def refused(self, reason: str, ingress_ip: str, user: str | None) -> None:
        """A request (or a known user's login) refused, by reason, on the ingress IP's
        account and on `user`'s (None: no user account to charge; NO_USER is the
        account of requests without a user). The caller never passes a user name the
        config does not know (bounded memory)."""
        accounts = [self._account(self.ingress, ingress_ip)]
        if user is not None:
            accounts.append(self._account(self.users, user))
        for usage in accounts:
            usage.refused[reason] = usage.refused.get(reason, 0) + 1
            self._dirty.add(usage)

    # -- interim records -----------------------------------------------------------------

    def is_due(self, conn: Any, now: float) -> bool:
        """`conn` (a relay or an association) owes a `tunnel_usage` record: an interval
        passed since its last one was due (since it started, for the first). A reload's
        new interval applies from the next record on."""
        recorded = conn.recorded
        return bool(now - (conn.started if recorded is None else recorded[5]) >= self.interval)

    def record(
        self, moved: Moved, recorded: Recorded | None, started: float, now: float, udp: bool
    ) -> tuple[dict[str, int] | None, Recorded]:
        """A due record: the fields of its `tunnel_usage` line (`record`: 1, 2, ...;
        what moved since the previous one), None when nothing moved (an idle tunnel
        logs no empty lines), and the connection's new `recorded`. After a stall of
        the loop one record covers the intervals missed (no burst of catch-up lines)."""
        rec = recorded or (0, 0, 0, 0, 0, started)
        due = rec[5] + self.interval
        if now - due >= self.interval:
            due = now  # the loop stalled: start counting again from now
        if moved == rec[:4]:
            return None, (*moved, rec[4], due)
        n = rec[4] + 1
        fields = {"record": n, "bytes_up": moved[0] - rec[0], "bytes_down": moved[1] - rec[1]}
        if udp:
            fields["datagrams_up"] = moved[2] - rec[2]
            fields["datagrams_down"] = moved[3] - rec[3]
        return fields, (moved[0], moved[1], moved[2], moved[3], n, due)

    # -- reports ------------------------------------------------------------------------

    def report(self, conns: Iterable[Any]) -> Report:
        """The accounts that closed a connection or refused a request since the last
        report, and those with open connections in `conns`, with their totals: closed
        connections plus what the open ones moved so far."""
        live: dict[Usage, list[int]] = {}
        for conn in conns:
            admitted = getattr(conn, "admitted", None)  # None: a session, no tunnel yet
            if admitted is None:
                continue
            udp = conn.udp
            moved = conn.moved()
            user = admitted[_USER]
            for usage in (
                self._account(self.users, NO_USER if user is None else user),
                self._account(self.ingress, admitted[_INGRESS]),
            ):
                lv = live.get(usage)
                if lv is None:
                    lv = live[usage] = [0] * 8
                if udp:
                    lv[1] += 1
                    lv[4] += moved[2]
                    lv[5] += moved[3]
                    lv[6] += moved[0]
                    lv[7] += moved[1]
                else:
                    lv[0] += 1
                    lv[2] += moved[0]
                    lv[3] += moved[1]
        out: Report = {"users": {}, "ingress": {}}
        # An account whose connections all closed since is dirty (closed() marks it).
        for usage in {*self._dirty, *live}:
            kind = "users" if self.users.get(usage.name) is usage else "ingress"
            out[kind][usage.name] = usage.row(live.get(usage))
        self._dirty = set()
        return out
