"""A worker's concurrency and rate limits, and its failed-login back-off.

Owns: open-tunnel counts per client IP and per user, open UDP associations (in all
and per user: each holds a port), the per-user token buckets, the
failed-login record per client IP, and the rate-limited `limit_reached` log event.
Must not: touch sockets; the acceptor and the sessions ask, then act.

Workers share nothing, so every figure is this worker's own: a per-IP limit of 10
with 4 workers lets one IP hold up to 10 per worker that its connections land on
(SO_REUSEPORT hashes each connection, so in practice its share of 40). The README's
Security section says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from socksd.config import Config, UserAccess
from workers.counters import WorkerCounters
from workers.events import LogGate

_NO_USER = UserAccess()
_FAILURE_MEMORY = 600.0  # a client IP's failed logins are forgotten after this quiet time
_MAX_TRACKED = 65536  # client IPs with failed logins kept at most (oldest dropped)


class _Bucket:
    """Token bucket: `rate` tokens a second, at most `burst` saved up."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(max(burst, 1))
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass(slots=True)
class _Failures:
    count: int
    last: float


class Claim:
    """One tunnel's place in the per-IP and per-user counts; `release()` once."""

    __slots__ = ("_limits", "ip", "user")

    def __init__(self, limits: Limits, ip: str | None, user: str | None) -> None:
        self._limits = limits
        self.ip = ip
        self.user = user

    def release(self) -> None:
        limits, self._limits = self._limits, None  # type: ignore[assignment]
        if limits is not None:
            limits._release(self)


class UdpClaim:
    """One UDP association's place in the association counts; `release()` once."""

    __slots__ = ("_limits", "user")

    def __init__(self, limits: Limits, user: str | None) -> None:
        self._limits = limits
        self.user = user

    def release(self) -> None:
        limits, self._limits = self._limits, None  # type: ignore[assignment]
        if limits is not None:
            limits._release_udp(self)


class Limits:
    """Per-worker limit state. `enabled` is False when nothing is limited, so the hot
    path asks nothing."""

    def __init__(self, config: Config, log: Any, counters: WorkerCounters) -> None:
        self._per_ip: dict[str, int] = {}
        self._per_user: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._failures: dict[str, _Failures] = {}
        self._udp_open = 0
        self._udp_per_user: dict[str, int] = {}
        self.log = log
        self._gates: dict[str, LogGate] = {}  # one per refusal reason: a fixed set
        self._counters = counters
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Take (a reload's) limits. Open-tunnel counts, failed logins and the tokens
        in each user's bucket are kept (a reload does not refill them), under the new
        rate and burst. Counting starts when a limit is switched on: tunnels opened
        before it are not counted against it."""
        self._cfg = config.limits
        self._users = config.access.users
        self.max_tunnels = config.worker_tunnel_limit()
        self.max_udp = config.worker_udp_limit()
        for user, bucket in list(self._buckets.items()):
            rate, burst = self._rate_of(self._users.get(user, _NO_USER))
            if not rate:
                del self._buckets[user]
                continue
            bucket.rate, bucket.burst = rate, float(burst)
            bucket.tokens = min(bucket.tokens, bucket.burst)
        per_user = self._cfg.max_tunnels_per_user or self._cfg.user_rate
        self.claims_needed = bool(
            self._cfg.max_tunnels_per_client_ip
            or per_user
            or any(u.max_tunnels or u.rate for u in self._users.values())
        )

    # -- concurrent tunnels and rates ------------------------------------------------

    def claim(self, client_ip: str, user: str | None, now: float) -> Claim | str:
        """A Claim for a new tunnel, or the reason it is refused."""
        cfg = self._cfg
        ip_limit = cfg.max_tunnels_per_client_ip
        if ip_limit and self._per_ip.get(client_ip, 0) >= ip_limit:
            return self.refuse("client_ip_tunnel_limit", now, client_ip=client_ip)
        if user is not None:
            ua = self._users.get(user, _NO_USER)
            user_limit = ua.max_tunnels or cfg.max_tunnels_per_user
            if user_limit and self._per_user.get(user, 0) >= user_limit:
                return self.refuse("user_tunnel_limit", now, user=user)
            rate, burst = self._rate_of(ua)
            if rate:
                bucket = self._buckets.get(user)
                if bucket is None:
                    bucket = self._buckets[user] = _Bucket(rate, burst, now)
                if not bucket.take(now):
                    return self.refuse("user_rate_limit", now, user=user)
            self._per_user[user] = self._per_user.get(user, 0) + 1
        self._per_ip[client_ip] = self._per_ip.get(client_ip, 0) + 1
        return Claim(self, client_ip, user)

    def claim_udp(self, user: str | None, now: float) -> UdpClaim | str:
        """A UdpClaim for a new association, or the reason it is refused: this worker's
        share of `limits.max_udp` is taken, or the user holds `max_udp_per_user`."""
        if self.max_udp and self._udp_open >= self.max_udp:
            return self.refuse("udp_limit", now, open=self._udp_open)
        per_user = self._cfg.max_udp_per_user
        if user is not None and per_user and self._udp_per_user.get(user, 0) >= per_user:
            return self.refuse("user_udp_limit", now, user=user)
        self._udp_open += 1
        if user is not None:
            self._udp_per_user[user] = self._udp_per_user.get(user, 0) + 1
        return UdpClaim(self, user)

    def _release_udp(self, claim: UdpClaim) -> None:
        self._udp_open -= 1
        user = claim.user
        if user is not None:
            left = self._udp_per_user.get(user, 0) - 1
            if left > 0:
                self._udp_per_user[user] = left
            else:
                self._udp_per_user.pop(user, None)

    def _rate_of(self, ua: UserAccess) -> tuple[float, int]:
        """A user's new tunnels per second (0: no limit) and burst: their own, else the
        global ones; the burst defaults to one second's worth (at least 1)."""
        rate = ua.rate or self._cfg.user_rate
        return rate, max(1, ua.burst or self._cfg.user_burst or int(rate))

    def _release(self, claim: Claim) -> None:
        for table, key in ((self._per_ip, claim.ip), (self._per_user, claim.user)):
            if key is None:
                continue
            left = table.get(key, 0) - 1
            if left > 0:
                table[key] = left
            else:
                table.pop(key, None)

    def refuse(self, reason: str, now: float, event: str = "limit_reached", **fields: Any) -> str:
        """Count a refusal (stats: refused) and log `event` at most once per interval per
        reason, with how many were not logged since the last line."""
        self._counters.refuse(reason)
        gate = self._gates.get(reason)
        if gate is None:
            gate = self._gates[reason] = LogGate()
        suppressed = gate.open(now)
        if suppressed is not None:
            self.log.warning(event, reason=reason, suppressed=suppressed, **fields)
        return reason

    # -- failed logins ---------------------------------------------------------------

    def auth_delay(self, client_ip: str, now: float) -> float:
        """Seconds to hold this client's next verdict: 0 until `auth_failures` failures,
        then `auth_backoff` doubling per further failure, at most `auth_backoff_max`."""
        rec = self._failures.get(client_ip)
        if rec is None:
            return 0.0
        if now - rec.last > _FAILURE_MEMORY:
            del self._failures[client_ip]
            return 0.0
        over = rec.count - self._cfg.auth_failures
        if over < 0:
            return 0.0
        return float(min(self._cfg.auth_backoff * 2 ** min(over, 30), self._cfg.auth_backoff_max))

    def auth_failed(self, client_ip: str, now: float) -> int:
        """Record a failed login; returns the client IP's failures so far."""
        rec = self._failures.get(client_ip)
        if rec is None:
            if len(self._failures) >= _MAX_TRACKED:
                self._failures.pop(next(iter(self._failures)))
            rec = self._failures[client_ip] = _Failures(0, now)
        rec.count += 1
        rec.last = now
        return rec.count

    def auth_succeeded(self, client_ip: str) -> None:
        self._failures.pop(client_ip, None)
