"""Names in requests to addresses, for the sessions of one worker; and its thread pool.

Owns: `resolve()`: a cached answer at once (`workers.dnscache`), else one lookup per
name however many sessions ask meanwhile (coalesced), on the configured backend
(`workers.cares`: c-ares on the worker's loop; or `getaddrinfo()` in the thread pool);
the lookup's deadline (`resolver.timeout`, never past `timeouts.connect`); serve-stale
when a refresh fails; naming each failure (`dns_nxdomain`, `dns_nodata`,
`dns_servfail`, `dns_timeout`, ...); the DNS figures (`DnsCounters`); and the thread
pool that what must block runs in (scrypt, and getaddrinfo with backend = "system").
Must not: touch sessions' sockets or decide policy: the session checks the destination
rules on every address, cached or not.

A callback gets `(addresses, None)` or `(None, reason)`, on the loop thread, exactly
once; for a cached name before `resolve()` returns.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from socksd.config import ResolverConfig
from workers.cares import CaresBackend
from workers.counters import DnsCounters
from workers.dnscache import DnsCache, Entry, Ips
from workers.hostsfile import HostsFile
from workers.loop import Loop, Timer

# (family, sockaddr) pairs, IPv4 first, for the session to connect to.
Addresses = list[tuple[socket.AddressFamily, tuple[Any, ...]]]
ResolveCallback = Callable[[Addresses | None, str | None], None]
# Failures after which an expired answer is served instead (RFC 8767 section 4): the
# name's servers did not answer usefully, which says nothing about the name.
_STALE_ON = frozenset({"dns_servfail", "dns_timeout", "dns_refused", "dns_unreachable"})
# Negative answers: the name (or its records of any family) does not exist.
_NEGATIVE = frozenset({"dns_nxdomain", "dns_nodata"})
# getaddrinfo() errors (backend = "system") by the reason they mean.
_GAI_REASONS = {
    socket.EAI_NONAME: "dns_nxdomain",
    getattr(socket, "EAI_NODATA", -5): "dns_nodata",
    socket.EAI_AGAIN: "dns_servfail",
}


class Resolver:
    """A worker's names: cache, coalescing, deadlines, backend; see the module docstring."""

    def __init__(
        self, loop: Loop, config: ResolverConfig, *, connect_timeout: float, counters: DnsCounters
    ) -> None:
        self._loop = loop
        self._pool = ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="pool")
        self._timeout = min(config.timeout, connect_timeout)
        system = config.backend == "system"
        self._cares = None if system else CaresBackend(loop, config, self._timeout)
        self._hosts = None if system else HostsFile()
        self._cache = DnsCache(**_cache_limits(config))
        self._lookups: dict[str, _Lookup] = {}  # name -> the lookup under way
        self._max_ttl = config.max_ttl
        self._config = config
        self.counters = counters

    def reconfigure(self, config: ResolverConfig, *, connect_timeout: float) -> None:
        """Take a reload's settings. `backend` and `threads` stay as started (a restart
        changes them; the supervisor says so). New nameservers, timeout or tries get a
        new c-ares channel: lookups under way finish on the old one, and answers
        cached from the old servers are dropped when the servers change."""
        old, self._config = self._config, config
        self._timeout = min(config.timeout, connect_timeout)
        self._max_ttl = config.max_ttl
        self._cache.retune(**_cache_limits(config))
        channel = (config.nameservers, config.timeout, config.tries)
        if self._cares is not None and channel != (old.nameservers, old.timeout, old.tries):
            self._cares.retire()
            self._cares = CaresBackend(self._loop, config, self._timeout)
        if config.nameservers != old.nameservers:
            self._cache.clear()

    def resolve(self, host: str, port: int, callback: ResolveCallback) -> None:
        """Resolve `host` for a TCP connect to `port`; see the module docstring."""
        name = host.lower()
        counters = self.counters
        hosts = self._hosts
        if hosts is not None:
            ips = hosts.get(name, self._loop.now)
            if ips is not None:  # /etc/hosts first, as the system resolver ("files dns")
                counters.hits += 1
                _call(callback, _sockaddrs(ips, port), None)
                return
        entry = self._cache.fresh(name, self._loop.now)
        if entry is not None:
            counters.hits += 1
            _answer(callback, entry, port)
            return
        lookup = self._lookups.get(name)
        if lookup is not None:
            counters.coalesced += 1
            lookup.waiters.append((port, callback))
            return
        counters.misses += 1
        numeric = _numeric(host)
        if numeric is not None:
            # An address written as a name ("127.1", "2130706433"): what getaddrinfo()
            # makes of it, without a query, so the destination rules see the address.
            _answer(
                callback, self._cache.answer(name, numeric, self._max_ttl, self._loop.now), port
            )
            return
        counters.lookups += 1
        lookup = self._lookups[name] = _Lookup(self, name, self._loop.now, port, callback)
        if self._cares is not None:
            try:
                self._cares.lookup(host, lookup.done)
            except Exception:  # noqa: BLE001 - c-ares refusing a name must not strand it
                # e.g. pycares' InvalidCodepoint for a name no front door should pass:
                # the lookup fails now, its waiters are answered, nothing stays pending.
                self._finish(lookup, (), 0.0, "dns_error")
                return
        else:
            self.run_blocking(_getaddrinfo, lookup.done_system, host)
        if not lookup.finished:
            lookup.timer = self._loop.call_later(self._timeout, lookup.expired)

    def _finish(self, lookup: _Lookup, ips: Ips, ttl: float, reason: str | None) -> None:
        """The lookup's outcome: cache it, count it, answer every waiter."""
        now = self._loop.now
        counters = self.counters
        if self._lookups.get(lookup.name) is lookup:
            del self._lookups[lookup.name]
        if reason is None:
            entry: Entry | None = self._cache.answer(lookup.name, ips, ttl, now)
        else:
            counters.failed(reason)
            entry = None
            if reason in _NEGATIVE:
                entry = self._cache.failure(lookup.name, reason, now)
            elif reason in _STALE_ON:
                entry = self._cache.stale(lookup.name, now)
                if entry is not None:
                    counters.stale += 1
        for port, callback in lookup.waiters:
            if entry is not None:
                _answer(callback, entry, port)
            else:
                _call(callback, None, reason)

    def late(self, lookup: _Lookup, ips: Ips, ttl: float) -> None:
        """An answer after the lookup's deadline: nobody waits, but the next asks may
        use it."""
        if ips:
            self._cache.answer(lookup.name, ips, ttl, self._loop.now)

    def run_blocking(
        self, fn: Callable[..., Any], callback: Callable[..., None], *args: Any
    ) -> None:
        """Run a blocking pure function (e.g. a password hash) off the loop.

        `callback(result, error)` runs on the loop thread.
        """
        future = self._pool.submit(fn, *args)
        future.add_done_callback(lambda f: self._loop.call_soon_threadsafe(_deliver, f, callback))

    def close(self) -> None:
        if self._cares is not None:
            self._cares.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Lookup:
    """One name being looked up, and the sessions waiting for it."""

    __slots__ = ("_resolver", "name", "started", "waiters", "timer", "finished")

    def __init__(
        self, resolver: Resolver, name: str, now: float, port: int, callback: ResolveCallback
    ) -> None:
        self._resolver = resolver
        self.name = name
        self.started = now
        self.waiters: list[tuple[int, ResolveCallback]] = [(port, callback)]
        self.timer: Timer | None = None
        self.finished = False

    def done(self, ips: Ips, ttl: float, reason: str | None) -> None:
        """The backend's answer (c-ares: on the loop, maybe within `lookup()`)."""
        if self.finished:
            self._resolver.late(self, ips, ttl)
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        resolver = self._resolver
        resolver.counters.took(resolver._loop.now - self.started)
        resolver._finish(self, ips, ttl, reason)

    def done_system(self, result: Ips | None, error: BaseException | None) -> None:
        """getaddrinfo()'s answer from the pool (no TTL: kept for resolver.min_ttl)."""
        if error is not None or not result:
            code = getattr(error, "errno", None)
            self.done((), 0.0, _GAI_REASONS.get(code, "dns_error") if error else "dns_nodata")
            return
        self.done(result, 0.0, None)

    def expired(self) -> None:
        """`resolver.timeout` passed without an answer."""
        self.timer = None
        if not self.finished:
            self.finished = True
            self._resolver._finish(self, (), 0.0, "dns_timeout")


def _cache_limits(config: ResolverConfig) -> dict[str, Any]:
    """The cache's size and TTL clamps, as DnsCache takes them."""
    return {
        "size": config.cache_size,
        "min_ttl": config.min_ttl,
        "max_ttl": config.max_ttl,
        "negative_ttl": config.negative_ttl,
        "stale_ttl": config.stale_ttl,
    }


def _answer(callback: ResolveCallback, entry: Entry, port: int) -> None:
    if entry.reason is not None:
        _call(callback, None, entry.reason)
    else:
        _call(callback, _sockaddrs(entry.ips, port), None)


def _sockaddrs(ips: Ips, port: int) -> Addresses:
    return [(family, (ip, port)) for family, ip in ips]


def _call(callback: Callable[..., None], *args: Any) -> None:
    """Run a callback on the loop; a failure in it is its owner's (a session closes
    itself), not the caller's: a lookup's other waiters are still answered."""
    try:
        callback(*args)
    except Exception as exc:
        on_crash = getattr(getattr(callback, "__self__", None), "on_crash", None)
        if on_crash is None:
            raise
        on_crash(exc)


def _numeric(host: str) -> Ips | None:
    """The address a numeric host names, as getaddrinfo() reads it (inet_aton's forms
    for IPv4: "127.1", "0x7f000001", "2130706433", "0177.0.0.1"); None for a name."""
    try:
        if ":" in host:
            packed = socket.inet_pton(socket.AF_INET6, host)
            return ((socket.AF_INET6, socket.inet_ntop(socket.AF_INET6, packed)),)
        if host[-1].isdigit():
            return ((socket.AF_INET, socket.inet_ntoa(socket.inet_aton(host))),)
    except OSError:
        pass
    return None


def _getaddrinfo(host: str) -> Ips:
    """The system resolver (NSS: files, dns, ...), in a pool thread; IPv4 first."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: dict[tuple[socket.AddressFamily, str], None] = {}
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            seen[(family, str(sockaddr[0]))] = None
    return tuple(sorted(seen, key=lambda item: item[0] != socket.AF_INET))


def _deliver(future: Future[Any], callback: Callable[..., None]) -> None:
    """A pool job's outcome, on the loop: `callback(result, error)`."""
    if future.cancelled():
        return  # the worker is shutting down
    error = future.exception()
    if error is not None:
        _call(callback, None, error)
    else:
        _call(callback, future.result(), None)
