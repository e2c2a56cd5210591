"""What every session of one worker shares.

Owns: the per-worker singletons (loop, resolver pool, authenticator, read buffer), the
config in force with the policies made from it (`use_config()`: at start and on every
reload), and the registry of open connections (shutdown, a reload's re-check).
Must not: hold per-connection state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from socksd import access
from socksd.access import ClientPolicy, DestinationPolicy
from socksd.config import Config
from socksd.policy import EgressPolicy
from socksd.revocation import Grant
from socksd.whitelist import ClientUsers
from workers.accounting import Ledger
from workers.authenticator import Authenticator
from workers.counters import WorkerCounters
from workers.limits import Limits
from workers.loop import Loop
from workers.pipes import PipePool
from workers.pressure import PortPressure
from workers.resolver import Resolver

RELAY_BUFFER = 64 * 1024


class Closable(Protocol):
    """An open connection of the worker: a session, a relay or a UDP association."""

    def close(self, reason: str, abortive: bool = False) -> None: ...

    def granted(self) -> Grant: ...  # what it was admitted on (a reload re-checks it)

    def revoke(self, by: str) -> None: ...  # a reload's config refuses it: end it now


# kw_only: several fields of the same type; built once per process, by name.
@dataclass(slots=True, eq=False, kw_only=True)
class WorkerContext:
    """The objects every session of this worker shares, built once by `workers.main`."""

    loop: Loop
    config: Config
    resolver: Resolver
    log: Any
    pressure: PortPressure
    limits: Limits
    counters: WorkerCounters = field(default_factory=WorkerCounters)
    ledger: Ledger | None = None  # per-user and per-ingress usage; None: accounting off
    pipes: PipePool | None = field(default_factory=PipePool)  # None: no splice
    buffer: memoryview = field(default_factory=lambda: memoryview(bytearray(RELAY_BUFFER)))
    open: set[Closable] = field(default_factory=set)
    # Sessions whose handshake or connect deadline runs (watched by DeadlineSweep).
    handshakes: set[Any] = field(default_factory=set)
    draining: bool = False  # the worker is stopping: kept-alive HTTP connections close
    _conn_seq: int = 0
    # Derived from the config by use_config() (at start, and by every reload):
    authenticator: Authenticator | None = None  # None: no method takes passwords
    client_users: ClientUsers = field(init=False)  # users known by their address
    ip_auth: bool = field(init=False)  # auth.method "ip...": a greeting's answer depends on it
    policy: EgressPolicy = field(init=False)
    clients: ClientPolicy = field(init=False)
    destinations: DestinationPolicy = field(init=False)
    socks5_off: bool = field(init=False)  # config.protocols has no "socks5" (SOCKS4 only)

    def use_config(self, config: Config, own: list[tuple[str, int]]) -> int:
        """Make `config` the one in force, with the policies made from it; `own`: the
        listen addresses as bound (port 0 means "any": a tunnel into one would loop).

        Returns:
            How many cached logins were dropped (users removed or changed).
        """
        self.config = config
        self.socks5_off = "socks5" not in config.protocols
        self.policy = EgressPolicy(config.egress.mappings)
        self.clients = ClientPolicy(config.access.clients, loopback_only=config.loopback_only)
        self.destinations = DestinationPolicy(config.access.destinations, own)
        self.ip_auth = "ip" in config.auth.method
        self.client_users = ClientUsers(
            {name: ua.clients for name, ua in config.access.users.items() if ua.clients}
        )
        if config.auth.method in ("none", "ip"):
            self.authenticator = None
        elif self.authenticator is None:
            self.authenticator = Authenticator(config.auth.users, self.resolver)
        else:
            return self.authenticator.update(config.auth.users)
        return 0

    def whitelisted(self, client_ip: str, ingress_ip: str) -> str | None:
        """The user `client_ip` is (access.users.NAME.clients) when it came in on one of
        that user's ingress IPs; None otherwise."""
        user = self.client_users.user_of(client_ip)
        if user is None:
            return None
        nets = self.config.access.users[user].ingress
        return user if access.ingress_allowed(nets, ingress_ip) else None

    def next_conn_id(self) -> int:
        self._conn_seq += 1
        return self._conn_seq
