"""What every session of one worker shares.

Owns: the per-worker singletons (loop, resolver pool, authenticator, read buffer) and
the registry of open connections used at shutdown.
Must not: hold per-connection state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from socksd.access import ClientPolicy, DestinationPolicy
from socksd.config import Config
from socksd.policy import EgressPolicy
from workers.authenticator import Authenticator
from workers.counters import WorkerCounters
from workers.limits import Limits
from workers.loop import Loop
from workers.pipes import PipePool
from workers.pressure import PortPressure
from workers.resolver import Resolver

RELAY_BUFFER = 64 * 1024


class Closable(Protocol):
    def close(self, reason: str, abortive: bool = False) -> None: ...


# kw_only: eleven fields, several of the same type; built once per process, by name.
@dataclass(slots=True, eq=False, kw_only=True)
class WorkerContext:
    """The objects every session of this worker shares, built once by `workers.main`."""

    loop: Loop
    config: Config
    resolver: Resolver
    authenticator: Authenticator | None
    log: Any
    pressure: PortPressure
    policy: EgressPolicy
    clients: ClientPolicy
    destinations: DestinationPolicy
    limits: Limits
    counters: WorkerCounters = field(default_factory=WorkerCounters)
    pipes: PipePool | None = field(default_factory=PipePool)  # None: no splice
    buffer: memoryview = field(default_factory=lambda: memoryview(bytearray(RELAY_BUFFER)))
    open: set[Closable] = field(default_factory=set)
    # Sessions whose handshake or connect deadline runs (watched by DeadlineSweep).
    handshakes: set[Any] = field(default_factory=set)
    _conn_seq: int = 0
    socks5_off: bool = field(init=False)  # config.protocols has no "socks5" (SOCKS4 only)

    def __post_init__(self) -> None:
        self.socks5_off = "socks5" not in self.config.protocols

    def next_conn_id(self) -> int:
        self._conn_seq += 1
        return self._conn_seq
