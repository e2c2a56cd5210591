"""The worker's timeouts, enforced by sweeps: one timer per kind, not one per connection.

Owns: the handshake, connect and HTTP keep-alive deadlines of sessions, the idle cut
of tunnels (and of forwarded HTTP requests), the idle end of UDP associations, and
when a long tunnel's `tunnel_usage` record is due (`accounting.interval`); how often
each is checked.
Must not: close anything itself; it calls the member's own ending (`on_deadline()`,
`close()`), which logs the connection's line.

Why sweeps: a timer per session (created, pushed on the heap, cancelled at the
handover) cost ~6,000 instructions a tunnel under callgrind, a timer per tunnel ~1.5 us.
The price is a cut up to one interval late, interval = min(1 s, timeout / 4).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from socksd.config import Config
from workers.accounting import Ledger
from workers.forward import Forward
from workers.loop import Loop
from workers.relay import Relay
from workers.session import Session
from workers.udp import UdpAssociation


class Sweep:
    """Every `interval` seconds, `expire(member)` for each member with
    `overdue(member, now - age)`: older than `age` seconds, or (age 0) past its own
    deadline."""

    __slots__ = ("_loop", "_members", "_age", "_overdue", "_expire", "interval")

    def __init__(
        self,
        loop: Loop,
        members: Collection[Any],
        overdue: Callable[[Any, float], bool],
        expire: Callable[[Any], object],
    ) -> None:
        self._loop = loop
        self._members = members
        self._overdue = overdue
        self._expire = expire
        self._age = 0.0
        self.interval = 1.0

    def retime(self, timeouts: tuple[float, ...], age: float) -> None:
        """The timeouts it enforces (at start, and a reload's from the next sweep on)."""
        self._age = age
        self.interval = min(1.0, *(t / 4 for t in timeouts))

    def start(self) -> None:
        self._loop.call_later(self.interval, self._sweep)

    def _sweep(self) -> None:
        cutoff = self._loop.now - self._age
        overdue = self._overdue
        for member in [m for m in self._members if overdue(m, cutoff)]:
            self._expire(member)
        self._loop.call_later(self.interval, self._sweep)


def _deadline_passed(session: Session, now: float) -> bool:
    return session.deadline <= now


def _relay_quiet(conn: object, cutoff: float) -> bool:
    kind = type(conn)
    return (kind is Relay or kind is Forward) and conn.quiet_since() <= cutoff  # type: ignore[attr-defined]


def _association_quiet(conn: object, cutoff: float) -> bool:
    return type(conn) is UdpAssociation and conn.quiet_since() <= cutoff


def _never(conn: object, now: float) -> bool:
    return False


def _record_usage(conn: Relay | Forward | UdpAssociation) -> None:
    conn.record_usage()


def _usage_due(ledger: Ledger) -> Callable[[Any, float], bool]:
    def due(conn: Any, now: float) -> bool:
        return type(conn) is not Session and ledger.is_due(conn, now)

    return due


def _cut_relay(relay: Relay | Forward) -> None:
    relay.close("idle_timeout", abortive=True)


def _end_association(assoc: UdpAssociation) -> None:
    assoc.close("idle_timeout")


def start(
    loop: Loop,
    *,
    handshakes: Collection[Session],
    open_conns: Collection[object],
    config: Config,
    ledger: Ledger | None,
) -> tuple[Sweep, ...]:
    """The worker's four sweeps: deadlines over `handshakes` (the sessions in their
    handshake or connect, each with its own `deadline`); tunnel idle, UDP association
    idle and usage records over `open_conns` (every open connection of the worker)."""
    sweeps = (
        Sweep(loop, handshakes, _deadline_passed, Session.on_deadline),
        Sweep(loop, open_conns, _relay_quiet, _cut_relay),
        Sweep(loop, open_conns, _association_quiet, _end_association),
        Sweep(loop, open_conns, _never if ledger is None else _usage_due(ledger), _record_usage),
    )
    retime(sweeps, config)
    for sweep in sweeps:
        sweep.start()
    return sweeps


def retime(sweeps: tuple[Sweep, ...], config: Config) -> None:
    """Give the sweeps of `start()` their timeouts (a reload's, too)."""
    deadlines, idle, udp_idle, usage = sweeps
    timeouts = config.timeouts
    # A kept-alive HTTP connection's wait for its next request is a deadline too.
    deadlines.retime((timeouts.handshake, timeouts.connect, timeouts.http_keepalive), 0.0)
    idle.retime((timeouts.idle,), timeouts.idle)
    udp_idle.retime((timeouts.udp_idle,), timeouts.udp_idle)
    # A record is up to one interval of this sweep late: min(1 s, accounting.interval / 4).
    usage.retime((config.accounting.interval,), 0.0)
