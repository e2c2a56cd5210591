"""The configuration tree: TOML in, frozen dataclasses out.

Owns: the schema, defaults, the embedded default config and `load_config()`.
Must not: open sockets or keep global state. Workers receive the `Config` explicitly.

Every error names the dotted key it is about (`timeouts.connect: must be > 0`), and
unknown keys are errors, so a typo never silently falls back to a default.

Users may also come from `auth.users_file`: a TOML file of `[users.NAME]` tables (the
password hash and the per-user rules of `[access.users.NAME]`), so that a provisioning
system rewrites one file. It is parsed with rtoml (Rust): 100,000 users take ~0.2 s
where tomllib takes ~1.9 s, and a reload must reach the workers within 2 s.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import rtoml

from socksd import access
from socksd.errors import ConfigError
from socksd.passwords import check_hash
from socksd.whitelist import ClientUsers

_Numbers = TypeVar("_Numbers", "Timeouts", "StatsConfig")

DEFAULT_CONFIG_TOML = """\
# socksd's embedded default: a SOCKS5 proxy on loopback, no authentication.
listen = ["127.0.0.1:1080"]
workers = "auto"
"""

LOG_LEVELS = ("debug", "info", "warning", "error")
AUTH_METHODS = ("none", "password", "ip", "ip_or_password", "ip_and_password")


def hostport(host: str, port: int) -> str:
    """ "host:port", with an IPv6 host in brackets ("[::1]:1080")."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One address to accept SOCKS clients on."""

    host: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return hostport(self.host, self.port)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; see the `[timeouts]` section of etc/socksd.toml."""

    handshake: float = 10.0
    connect: float = 10.0
    idle: float = 300.0
    bind: float = 60.0  # BIND: how long the listener waits for the expected peer
    udp_idle: float = 120.0  # UDP ASSOCIATE: an association with no datagram this long ends
    # HTTP: how long a kept-alive client connection may wait for its next request.
    http_keepalive: float = 60.0


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """RFC 1929 users; `method = "password"` makes them mandatory."""

    # "ip...": users known by their address (access.users.NAME.clients) too.
    method: Literal["none", "password", "ip", "ip_or_password", "ip_and_password"] = "none"
    # name -> its scrypt hash, as text (checked by passwords.check_hash; parsed only
    # when a password is verified against it): 100,000 users pickle to a worker in
    # ~50 ms as text, ~0.5 s as objects.
    users: Mapping[str, str] = field(default_factory=dict)
    users_file: str | None = None  # as configured; its users are in `users` already
    watch: bool = False  # the supervisor reloads when users_file changes


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True, slots=True)
class ResolverConfig:
    """How names in requests are resolved; see the `[resolver]` section of etc/socksd.toml."""

    # "cares": c-ares on each worker's own loop (reads /etc/resolv.conf and /etc/hosts);
    # "system": getaddrinfo() in the thread pool (for hosts that need other NSS modules).
    backend: Literal["cares", "system"] = "cares"
    nameservers: tuple[str, ...] = ()  # "ip" or "ip:port" / "[v6]:port"; () = resolv.conf
    timeout: float = 5.0  # a lookup unanswered this long fails: dns_timeout (reply 0x04)
    tries: int = 2  # c-ares attempts per server within `timeout`
    min_ttl: float = 1.0  # an answer is kept at least this long ...
    max_ttl: float = 300.0  # ... and at most this long, whatever its TTL says
    negative_ttl: float = 5.0  # NXDOMAIN / no data answers kept this long
    stale_ttl: float = 30.0  # an expired answer served when its refresh fails (RFC 8767)
    cache_size: int = 10000  # names kept per worker (least recently used dropped)
    threads: int = 4  # the pool for scrypt and, with backend = "system", getaddrinfo


@dataclass(frozen=True, slots=True)
class StatsConfig:
    """How workers report to the supervisor and how the supervisor reports on."""

    interval: float = 1.0  # worker -> supervisor stats line
    log_interval: float = 60.0  # supervisor `stats` log event
    heartbeat_timeout: float = 10.0  # a worker silent this long is hung: TERM, then KILL
    timewait_interval: float = 10.0  # kernel TIME_WAIT sample (supervisor side)


@dataclass(frozen=True, slots=True)
class UdpConfig:
    """UDP ASSOCIATE behind NAT: the address a reply names, the relay's ports."""

    # ingress IP -> the address BND.ADDR carries for associations on it (1:1 NAT).
    advertise: Mapping[str, str] = field(default_factory=dict)
    port_range: tuple[int, int] | None = None  # the relay socket's port; None: any


@dataclass(frozen=True, slots=True)
class AccountingConfig:
    """Per-customer usage: per user and per ingress IP, and interim records."""

    enabled: bool = True
    interval: float = 60.0  # a `tunnel_usage` line per tunnel open longer than this


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """What `/metrics` exposes beyond the per-worker and per-egress-IP series."""

    per_user: bool = False  # socksd_user_* series (one set per user: opt-in)
    per_ingress: bool = False  # socksd_ingress_* series
    max_users: int = 1000  # users with series; the others are summed as the overflow


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """The local control socket `socksd stats` talks to."""

    socket: str = "auto"

    def path(self) -> str:
        """The socket path. "auto": $RUNTIME_DIRECTORY (set by systemd), else
        /run/socksd when it exists (the service's), else /tmp/socksd-<uid>.sock."""
        if self.socket != "auto":
            return self.socket
        runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        if not runtime and os.path.isdir("/run/socksd"):
            runtime = "/run/socksd"
        if runtime:
            return os.path.join(runtime, "control.sock")
        return f"/tmp/socksd-{os.getuid()}.sock"


@dataclass(frozen=True, slots=True)
class EgressMapping:
    """Tunnels arriving on an address in `ingress` leave from `ipv4` / `ipv6`."""

    ingress: ipaddress.IPv4Network | ipaddress.IPv6Network
    ipv4: str | None = None
    ipv6: str | None = None


@dataclass(frozen=True, slots=True)
class EgressConfig:
    """Egress: source address mapping, exhaustion retries, port-pressure reporting."""

    # Delays (s) before each retry of a connect() that failed with EADDRNOTAVAIL.
    retry_delays: tuple[float, ...] = (0.01, 0.01, 0.01)
    mappings: tuple[EgressMapping, ...] = ()
    pressure_threshold: float = 0.8
    max_tracked_targets: int = 1024


@dataclass(frozen=True, slots=True)
class UserAccess:
    """What one RFC 1929 user may do, on top of the global rules and limits."""

    ingress: tuple[access.Net, ...] = ()  # IPs it may come in on (= leave from); () = any
    clients: tuple[access.Net, ...] = ()  # addresses that are this user (auth.method "ip...")
    destinations: tuple[access.Rule, ...] = ()  # checked before access.destinations
    max_tunnels: int = 0  # concurrent, per worker share; 0 = limits.max_tunnels_per_user
    rate: float = 0.0  # new tunnels per second; 0 = limits.user_rate
    burst: int = 0  # 0 = limits.user_burst


@dataclass(frozen=True, slots=True)
class AccessConfig:
    """Who may connect and where tunnels may go; see the README's Security section."""

    allow_open_proxy: bool = False
    clients: tuple[access.Rule, ...] = ()
    destinations: tuple[access.Rule, ...] = ()
    users: Mapping[str, UserAccess] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Concurrency and rate limits; 0 = no limit. Workers share nothing, so a
    proxy-wide figure is enforced as an equal share per worker (rounded up)."""

    max_tunnels: int = 0
    max_tunnels_per_worker: int = 0
    max_tunnels_per_client_ip: int = 0
    max_tunnels_per_user: int = 0
    max_udp: int = 0  # open UDP associations, proxy-wide (a per-worker share)
    max_udp_per_user: int = 0  # open UDP associations per user, per worker
    user_rate: float = 0.0
    user_burst: int = 0
    auth_failures: int = 5  # failed logins from one client IP before delays start
    auth_backoff: float = 1.0  # the first delay; doubles with each further failure
    auth_backoff_max: float = 30.0


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration."""

    listen: tuple[ListenAddress, ...]
    workers: int | Literal["auto"] = "auto"
    timeouts: Timeouts = Timeouts()
    auth: AuthConfig = field(default_factory=AuthConfig)
    log: LogConfig = LogConfig()
    resolver: ResolverConfig = ResolverConfig()
    egress: EgressConfig = EgressConfig()
    shutdown_timeout: float = 30.0
    stats: StatsConfig = StatsConfig()
    control: ControlConfig = ControlConfig()
    metrics_listen: ListenAddress | None = None
    metrics: MetricsConfig = MetricsConfig()
    accounting: AccountingConfig = AccountingConfig()
    udp: UdpConfig = field(default_factory=UdpConfig)
    relay_splice: bool = True
    access: AccessConfig = field(default_factory=AccessConfig)
    limits: LimitsConfig = LimitsConfig()
    protocols: frozenset[str] = frozenset({"socks5"})
    source: str = "<embedded default>"

    @property
    def worker_count(self) -> int:
        if self.workers == "auto":
            return os.cpu_count() or 1
        return self.workers

    @property
    def loopback_only(self) -> bool:
        """Every listen address is a loopback address."""
        return all(access.is_loopback(a.host) for a in self.listen)

    def worker_udp_limit(self) -> int:
        """Open UDP associations one worker may hold (0 = no limit): its share."""
        return -(-self.limits.max_udp // self.worker_count) if self.limits.max_udp else 0

    def worker_tunnel_limit(self) -> int:
        """Open tunnels one worker may hold (0 = no limit)."""
        limits = [self.limits.max_tunnels_per_worker]
        if self.limits.max_tunnels:
            limits.append(-(-self.limits.max_tunnels // self.worker_count))
        return min((n for n in limits if n), default=0)


class _Table:
    """A TOML table being read, remembering its dotted path and which keys were used."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        self._data = data
        self._path = path
        self._used: set[str] = set()

    @property
    def path(self) -> str:
        return self._path

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def get(self, name: str, default: Any = None) -> Any:
        self._used.add(name)
        return self._data.get(name, default)

    def table(self, name: str) -> _Table:
        value = self.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.key(name)}: must be a table")
        return _Table(value, self.key(name))

    def number(self, name: str, default: float) -> float:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.key(name)}: must be a number, got {value!r}")
        if value <= 0:
            raise ConfigError(f"{self.key(name)}: must be > 0, got {value!r}")
        return float(value)

    def flag(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: must be true or false, got {value!r}")
        return value

    def count(self, name: str, default: int) -> int:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{self.key(name)}: must be an integer >= 0, got {value!r}")
        return value

    def seconds(self, cls: type[_Numbers]) -> _Numbers:
        """A whole table of positive numbers: each field of `cls` (a dataclass), in field
        order, its default when absent; then no other key."""
        default = cls()
        values = {f.name: self.number(f.name, getattr(default, f.name)) for f in fields(cls)}
        self.done()
        return cls(**values)

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


def parse_listen(text: object, key: str = "listen") -> ListenAddress:
    """Parse "host:port" or "[v6]:port"."""
    if not isinstance(text, str):
        raise ConfigError(f'{key}: must be a string "host:port", got {text!r}')
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f'{key}: {text!r} is not "host:port" (IPv6 as "[::1]:1080")')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        want_v6 = True
    else:
        want_v6 = False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{key}: {host!r} is not an IP address") from None
    if (ip.version == 6) != want_v6:
        raise ConfigError(f'{key}: write IPv6 addresses in brackets, as "[::1]:1080"')
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{key}: port {port_text!r} is not in 0..65535")
    return ListenAddress(ip.compressed, int(port_text))


def _parse_workers(value: object) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f'workers: must be "auto" or an integer >= 1, got {value!r}')
    return value


def _parse_auth(t: _Table, base: Path) -> tuple[AuthConfig, dict[str, UserAccess]]:
    """The auth section, with the users of `auth.users_file` (relative to `base`) merged
    in; also the per-user rules that file gives."""
    method = t.get("method", "none")
    if method not in AUTH_METHODS:
        names = ", ".join(f'"{m}"' for m in AUTH_METHODS)
        raise ConfigError(f"{t.key('method')}: must be one of {names}, got {method!r}")
    users_t = t.table("users")
    users: dict[str, str] = {}
    for name in list(users_t._data):
        users[name] = _user_hash(name, users_t.get(name), users_t.key(name))
    users_file = t.get("users_file")
    if users_file is not None and (not isinstance(users_file, str) or not users_file):
        raise ConfigError(f"{t.key('users_file')}: must be a path")
    watch = t.flag("watch", False)
    if watch and users_file is None:
        raise ConfigError(f"{t.key('watch')}: watches auth.users_file, which is not set")
    t.done()
    file_access: dict[str, UserAccess] = {}
    if users_file is not None:
        path = base / users_file
        file_users, file_access = load_users_file(path, passwords_optional="ip" in method)
        for name in file_users:
            if name in users:
                raise ConfigError(f"auth.users.{name}: also in auth.users_file {str(path)!r}")
        users.update(file_users)
    if method in ("password", "ip_or_password", "ip_and_password") and not users:
        raise ConfigError(f'auth.users: method is "{method}" but no user has a password')
    auth = AuthConfig(method=method, users=users, users_file=users_file, watch=watch)
    return auth, file_access


def _user_hash(name: str, encoded: object, key: str) -> str:
    if not 1 <= len(name.encode("utf-8")) <= 255:
        raise ConfigError(f"{key}: user names are 1..255 bytes (RFC 1929)")
    if not isinstance(encoded, str):
        raise ConfigError(f"{key}: must be a password hash string")
    try:
        return check_hash(encoded)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def users_file_path(config: Config) -> Path | None:
    """Where `auth.users_file` is (None: not set)."""
    if config.auth.users_file is None:
        return None
    return _base_dir(config.source) / config.auth.users_file


def _base_dir(source: str) -> Path:
    """Relative paths in a config file are relative to its directory."""
    return Path(source).parent if not source.startswith("<") else Path.cwd()


def load_users_file(
    path: Path, passwords_optional: bool = False
) -> tuple[dict[str, str], dict[str, UserAccess]]:
    """Users and their rules from a users file: `[users.NAME]` tables with `password`
    (a `socksd passwd` hash; optional with `passwords_optional`, for users known by
    their `clients` addresses) and the keys of `[access.users.NAME]`.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown key or bad value, named as
            "auth.users_file (PATH): users.NAME.KEY: ...".
    """
    where = f"auth.users_file ({os.fspath(path)})"
    data = _read_toml(path, where, rtoml.loads, rtoml.TomlParsingError)
    try:
        root = _Table(data, "")
        users_t = root.table("users")
        root.done()
        users: dict[str, str] = {}
        rules: dict[str, UserAccess] = {}
        plain = UserAccess()
        for name, raw in users_t._data.items():
            if type(raw) is dict and len(raw) == 1 and "password" in raw:
                # Most users: a password and no rules (no _Table, no UserAccess).
                users[name] = _user_hash(name, raw["password"], f"users.{name}.password")
                continue
            one = users_t.table(name)
            encoded = one.get("password")
            if encoded is not None or not passwords_optional:
                users[name] = _user_hash(name, encoded, one.key("password"))
            ua = _user_access(one)
            if ua != plain:
                rules[name] = ua  # most users have none: no object kept for them
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return users, rules


def _parse_ip(value: object, key: str, version: int) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be an IP address string, got {value!r}")
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"{key}: {value!r} is not an IP address") from None
    if ip.version != version:
        raise ConfigError(f"{key}: must be an IPv{version} address, got {value!r}")
    return ip.compressed


def _parse_network(value: object, key: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value, strict=False)
        except ValueError:
            pass
    raise ConfigError(f"{key}: must be an IP address or CIDR, got {value!r}")


def _tables(value: object, key: str) -> list[_Table]:
    """An array of tables (`[[key]]`), each as a `_Table` named `key[i]`."""
    if not isinstance(value, list):
        raise ConfigError(f"{key}: must be an array of tables ([[{key}]])")
    out = []
    for i, raw in enumerate(value):
        if not isinstance(raw, dict):
            raise ConfigError(f"{key}[{i}]: must be a table")
        out.append(_Table(raw, f"{key}[{i}]"))
    return out


def _parse_resolver(t: _Table) -> ResolverConfig:
    d = ResolverConfig()
    backend = t.get("backend", d.backend)
    if backend not in ("cares", "system"):
        raise ConfigError(f'resolver.backend: must be "cares" or "system", got {backend!r}')
    servers = t.get("nameservers", [])
    if not isinstance(servers, list):
        raise ConfigError('resolver.nameservers: must be a list like ["127.0.0.53:53"]')
    nameservers = tuple(_parse_nameserver(s, t.key("nameservers")) for s in servers)
    if nameservers and backend == "system":
        raise ConfigError('resolver.nameservers: only with backend = "cares"')
    ints = {}
    for name, low, high in (("tries", 1, 10), ("cache_size", 1, 10_000_000), ("threads", 1, 64)):
        value = t.get(name, getattr(d, name))
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{t.key(name)}: must be an integer in {low}..{high}, got {value!r}")
        ints[name] = value
    config = ResolverConfig(
        backend=backend,
        nameservers=nameservers,
        timeout=t.number("timeout", d.timeout),
        min_ttl=t.number("min_ttl", d.min_ttl),
        max_ttl=t.number("max_ttl", d.max_ttl),
        negative_ttl=t.number("negative_ttl", d.negative_ttl),
        stale_ttl=t.number("stale_ttl", d.stale_ttl),
        **ints,
    )
    t.done()
    if config.min_ttl > config.max_ttl:
        raise ConfigError("resolver.min_ttl: must not be above resolver.max_ttl")
    return config


def _parse_nameserver(text: object, key: str) -> str:
    """ "ip", "ip:port" or "[v6]:port" -> the text c-ares takes ("ip:port", "[v6]:port")."""
    if not isinstance(text, str):
        raise ConfigError(f"{key}: each entry must be a string, got {text!r}")
    try:
        return str(ListenAddress(ipaddress.ip_address(text).compressed, 53))
    except ValueError:
        pass
    address = parse_listen(text, key)
    if address.port == 0:
        raise ConfigError(f"{key}: port 0 in {text!r}")
    return str(address)


def _parse_egress(t: _Table) -> EgressConfig:
    default = EgressConfig()
    rt = t.table("retry")
    delays_raw = rt.get("delays", list(default.retry_delays))
    if not isinstance(delays_raw, list) or len(delays_raw) > 20:
        raise ConfigError(f"{rt.key('delays')}: must be a list of at most 20 delays (seconds)")
    delays = []
    for i, d in enumerate(delays_raw):
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 <= d <= 60:
            raise ConfigError(f"{rt.key('delays')}[{i}]: must be a number of seconds in 0..60")
        delays.append(float(d))
    rt.done()
    mappings = []
    for mt in _tables(t.get("map", []), t.key("map")):
        ingress = _parse_network(mt.get("ingress"), mt.key("ingress"))
        v4 = mt.get("ipv4")
        v6 = mt.get("ipv6")
        mapping = EgressMapping(
            ingress=ingress,
            ipv4=None if v4 is None else _parse_ip(v4, mt.key("ipv4"), 4),
            ipv6=None if v6 is None else _parse_ip(v6, mt.key("ipv6"), 6),
        )
        if mapping.ipv4 is None and mapping.ipv6 is None:
            raise ConfigError(f"{mt.key('ipv4')}: a mapping needs ipv4, ipv6 or both")
        mt.done()
        mappings.append(mapping)
    threshold = t.number("pressure_threshold", default.pressure_threshold)
    if threshold > 1:
        raise ConfigError(f"{t.key('pressure_threshold')}: a fraction in (0, 1], got {threshold}")
    tracked = t.get("max_tracked_targets", default.max_tracked_targets)
    if isinstance(tracked, bool) or not isinstance(tracked, int) or not 16 <= tracked <= 1 << 20:
        raise ConfigError(f"{t.key('max_tracked_targets')}: an integer in 16..1048576")
    t.done()
    return EgressConfig(
        retry_delays=tuple(delays),
        mappings=tuple(mappings),
        pressure_threshold=threshold,
        max_tracked_targets=tracked,
    )


def _parse_udp(t: _Table) -> UdpConfig:
    advertise: dict[str, str] = {}
    for at in _tables(t.get("advertise", []), t.key("advertise")):
        raw = at.get("ingress")
        version = 6 if isinstance(raw, str) and ":" in raw else 4
        ingress = _parse_ip(raw, at.key("ingress"), version)
        if ingress in advertise:
            raise ConfigError(f"{at.key('ingress')}: {ingress} is advertised twice")
        # The same family: a client reads BND.ADDR of the family it came in with.
        advertise[ingress] = _parse_ip(at.get("address"), at.key("address"), version)
        at.done()
    raw_range = t.get("port_range")
    port_range = None
    if raw_range is not None:
        ok = (
            isinstance(raw_range, list)
            and len(raw_range) == 2
            and all(isinstance(p, int) and not isinstance(p, bool) for p in raw_range)
            and 1024 <= raw_range[0] <= raw_range[1] <= 65535
        )
        if not ok:
            # Below 1024 every bind would fail (EACCES) for the unit's unprivileged user.
            raise ConfigError(f"{t.key('port_range')}: must be [low, high] within 1024..65535")
        port_range = (raw_range[0], raw_range[1])
    t.done()
    return UdpConfig(advertise=advertise, port_range=port_range)


def _check_advertised(udp: UdpConfig, listen: tuple[ListenAddress, ...]) -> None:
    """An advertised ingress that no listen address can be (not listed, and no
    wildcard of its family) would never be used: a typo, said now."""
    hosts = {a.host for a in listen}
    for ingress in udp.advertise:
        wildcard = "::" if ":" in ingress else "0.0.0.0"
        if ingress not in hosts and wildcard not in hosts:
            raise ConfigError(
                f"udp.advertise: ingress {ingress} is not a listen address (listen: "
                f"{', '.join(sorted(hosts))})"
            )


def _count(t: _Table, name: str, default: int, hi: int = 1 << 30) -> int:
    value = t.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise ConfigError(f"{t.key(name)}: must be an integer in 0..{hi} (0 = no limit)")
    return value


def _rate(t: _Table, name: str, default: float) -> float:
    value = t.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{t.key(name)}: must be a number >= 0 (0 = no limit)")
    return float(value)


def _parse_ports(value: object, key: str) -> tuple[tuple[int, int], ...]:
    """[80, 443, "8000-8999"] -> ((80, 80), (443, 443), (8000, 8999))."""
    if not isinstance(value, list) or not value:
        raise ConfigError(f'{key}: must be a non-empty list of ports or "low-high" ranges')
    out = []
    for i, item in enumerate(value):
        lo_text, _, hi_text = str(item).partition("-") if isinstance(item, str) else ("", "", "")
        if isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif lo_text.isdigit() and (hi_text.isdigit() or not hi_text):
            lo, hi = int(lo_text), int(hi_text or lo_text)
        else:
            raise ConfigError(f'{key}[{i}]: must be a port or a "low-high" range, got {item!r}')
        if not 0 <= lo <= hi <= 65535:
            raise ConfigError(f"{key}[{i}]: ports are 0..65535, low <= high, got {item!r}")
        out.append((lo, hi))
    return tuple(out)


def _parse_nets(value: object, key: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: must be a non-empty list of IP addresses or CIDRs")
    return [_parse_network(v, f"{key}[{i}]") for i, v in enumerate(value)]


def _parse_rules(value: object, key: str, address_key: str) -> tuple[access.Rule, ...]:
    """An array of {action, <address_key>, ports} tables; first match wins."""
    rules = []
    for rt in _tables(value, key):
        action = rt.get("action")
        if action not in ("allow", "deny"):
            raise ConfigError(f'{rt.key("action")}: must be "allow" or "deny", got {action!r}')
        nets_raw = rt.get(address_key)
        nets = [] if nets_raw is None else _parse_nets(nets_raw, rt.key(address_key))
        ports: tuple[tuple[int, int], ...] = ()
        if address_key == "to" and rt.get("ports") is not None:
            ports = _parse_ports(rt.get("ports"), rt.key("ports"))
        rt.done()
        rules.append(access.make_rule(action, nets, ports, rt.path))
    return tuple(rules)


def _parse_access(
    t: _Table, auth: AuthConfig, file_rules: Mapping[str, UserAccess]
) -> AccessConfig:
    open_proxy = t.flag("allow_open_proxy", False)
    clients = _parse_rules(t.get("clients", []), t.key("clients"), "from")
    destinations = _parse_rules(t.get("destinations", []), t.key("destinations"), "to")
    ut = t.table("users")
    users = dict(file_rules)
    for name in list(ut._data):
        ukey = ut.key(name)
        if name in file_rules:
            raise ConfigError(f"{ukey}: its rules are in auth.users_file")
        users[name] = ua = _user_access(ut.table(name))
        # A user known only by its addresses needs no password (auth.method "ip...").
        if name not in auth.users and not (ua.clients and "ip" in auth.method):
            raise ConfigError(f"{ukey}: no such user in auth.users")
    ut.done()
    t.done()
    _check_clients(auth, users)
    return AccessConfig(open_proxy, clients, destinations, users)


def _check_clients(auth: AuthConfig, users: Mapping[str, UserAccess]) -> None:
    """The whitelists: disjoint, used by an "ip..." method, and (ip_and_password) only
    for users who also have a password."""
    known = {name: ua.clients for name, ua in users.items() if ua.clients}
    try:
        ClientUsers(known)
    except ValueError as exc:
        raise ConfigError(f"access.users: {exc}") from None
    if known and "ip" not in auth.method:
        name = next(iter(known))
        raise ConfigError(
            f'access.users.{name}.clients: needs auth.method "ip", "ip_or_password" or '
            f'"ip_and_password", not "{auth.method}"'
        )
    if "ip" in auth.method and not known:
        raise ConfigError(f'auth.method: "{auth.method}" but no access.users.NAME.clients')
    if auth.method == "ip_and_password":
        for name in known:
            if name not in auth.users:
                raise ConfigError(
                    f'access.users.{name}.clients: "ip_and_password" needs its password too'
                )


def _user_access(one: _Table) -> UserAccess:
    """One user's rules (then no other key but `password` in a users file)."""
    ingress_raw = one.get("ingress")
    ingress = () if ingress_raw is None else _parse_nets(ingress_raw, one.key("ingress"))
    clients_raw = one.get("clients")
    clients = () if clients_raw is None else _parse_nets(clients_raw, one.key("clients"))
    ua = UserAccess(
        ingress=tuple(access.Net.parse(n) for n in ingress),
        clients=tuple(access.Net.parse(n) for n in clients),
        destinations=_parse_rules(one.get("destinations", []), one.key("destinations"), "to"),
        max_tunnels=_count(one, "max_tunnels", 0),
        rate=_rate(one, "rate", 0.0),
        burst=_count(one, "burst", 0),
    )
    one.done()
    return ua


def _parse_limits(t: _Table) -> LimitsConfig:
    d = LimitsConfig()
    limits = LimitsConfig(
        max_tunnels=_count(t, "max_tunnels", d.max_tunnels),
        max_tunnels_per_worker=_count(t, "max_tunnels_per_worker", d.max_tunnels_per_worker),
        max_tunnels_per_client_ip=_count(
            t, "max_tunnels_per_client_ip", d.max_tunnels_per_client_ip
        ),
        max_tunnels_per_user=_count(t, "max_tunnels_per_user", d.max_tunnels_per_user),
        max_udp=_count(t, "max_udp", d.max_udp),
        max_udp_per_user=_count(t, "max_udp_per_user", d.max_udp_per_user),
        user_rate=_rate(t, "user_rate", d.user_rate),
        user_burst=_count(t, "user_burst", d.user_burst),
        auth_failures=_count(t, "auth_failures", d.auth_failures, hi=1000),
        auth_backoff=t.number("auth_backoff", d.auth_backoff),
        auth_backoff_max=t.number("auth_backoff_max", d.auth_backoff_max),
    )
    t.done()
    return limits


def check_open_proxy(config: Config) -> None:
    """Refuse an accidental open proxy: a non-loopback listener that anyone may use."""
    if config.loopback_only or config.access.allow_open_proxy:
        return
    if config.access.clients:
        return
    first = next(a for a in config.listen if not access.is_loopback(a.host))
    if config.auth.method == "none":
        raise ConfigError(
            f'listen: {first} is not a loopback address and auth.method is "none" with no '
            '[[access.clients]] rule: that is an open proxy. Set auth.method = "password", '
            "add [[access.clients]] rules, or set access.allow_open_proxy = true"
        )
    if "socks4" in config.protocols and config.auth.method == "password":
        # SOCKS4 carries no password: a user name alone would open the proxy to anyone
        # who guesses one.
        raise ConfigError(
            f"protocols: socks4 on {first} (not loopback) needs [[access.clients]] rules: "
            "SOCKS4 has no password, so auth.users only identify its clients"
        )


def parse_config(data: Mapping[str, Any], source: str) -> Config:
    """Validate a decoded TOML document into a `Config`."""
    root = _Table(data, "")
    listen_raw = root.get("listen", ["127.0.0.1:1080"])
    if not isinstance(listen_raw, list) or not listen_raw:
        raise ConfigError('listen: must be a non-empty list of "host:port" strings')
    listen = tuple(parse_listen(item, f"listen[{i}]") for i, item in enumerate(listen_raw))
    if len(set(listen)) != len(listen):
        raise ConfigError("listen: an address is listed twice")
    if len(listen) > 64:  # a reload passes a worker its new sockets, 64 at most at once
        raise ConfigError("listen: at most 64 addresses")
    workers = _parse_workers(root.get("workers", "auto"))
    protocols_raw = root.get("protocols", ["socks5"])
    if (
        not isinstance(protocols_raw, list)
        or not protocols_raw
        or any(p not in ("socks5", "socks4", "http") for p in protocols_raw)
    ):
        raise ConfigError('protocols: a non-empty list of "socks5", "socks4" and "http"')

    timeouts = root.table("timeouts").seconds(Timeouts)

    auth, file_rules = _parse_auth(root.table("auth"), _base_dir(source))

    lt = root.table("log")
    level = lt.get("level", "info")
    if level not in LOG_LEVELS:
        raise ConfigError(f"log.level: must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    lt.done()

    resolver = _parse_resolver(root.table("resolver"))

    egress = _parse_egress(root.table("egress"))
    shutdown_timeout = root.number("shutdown_timeout", 30.0)

    stats = root.table("stats").seconds(StatsConfig)
    if stats.heartbeat_timeout < 2 * stats.interval:
        raise ConfigError("stats.heartbeat_timeout: must be at least twice stats.interval")

    ct = root.table("control")
    control_socket = ct.get("socket", "auto")
    if not isinstance(control_socket, str) or not control_socket:
        raise ConfigError(f'control.socket: must be a path or "auto", got {control_socket!r}')
    ct.done()

    rl = root.table("relay")
    splice = rl.flag("splice", True)
    rl.done()

    mt = root.table("metrics")
    metrics_raw = mt.get("listen")
    metrics_listen = None if metrics_raw is None else parse_listen(metrics_raw, "metrics.listen")
    metrics = MetricsConfig(
        per_user=mt.flag("per_user", False),
        per_ingress=mt.flag("per_ingress", False),
        max_users=mt.count("max_users", 1000),
    )
    mt.done()

    udp = _parse_udp(root.table("udp"))
    _check_advertised(udp, listen)

    at = root.table("accounting")
    accounting = AccountingConfig(
        enabled=at.flag("enabled", True), interval=at.number("interval", 60.0)
    )
    if accounting.interval < 0.5:
        # The record sweep runs every interval / 4 over every open connection.
        raise ConfigError(f"accounting.interval: must be >= 0.5 s, got {accounting.interval}")
    at.done()

    access_config = _parse_access(root.table("access"), auth, file_rules)
    if access_config.users and auth.method == "none":
        raise ConfigError('access.users: per-user rules need users: auth.method is "none"')
    limits = _parse_limits(root.table("limits"))

    root.done()
    config = Config(
        listen=listen,
        workers=workers,
        timeouts=timeouts,
        auth=auth,
        log=LogConfig(level=level),
        resolver=resolver,
        egress=egress,
        shutdown_timeout=shutdown_timeout,
        stats=stats,
        control=ControlConfig(control_socket),
        metrics_listen=metrics_listen,
        metrics=metrics,
        accounting=accounting,
        udp=udp,
        relay_splice=splice,
        access=access_config,
        limits=limits,
        protocols=frozenset(protocols_raw),
        source=source,
    )
    check_open_proxy(config)
    return config


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a config file, or the embedded default when `path` is None.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown key or bad value.
    """
    if path is None:
        return parse_config(tomllib.loads(DEFAULT_CONFIG_TOML), "<embedded default>")
    data = _read_toml(
        Path(path), f"config {os.fspath(path)!r}", tomllib.loads, tomllib.TOMLDecodeError
    )
    return parse_config(data, os.fspath(path))


def _read_toml(
    path: Path, name: str, loads: Callable[[str], dict[str, Any]], error: type[Exception]
) -> dict[str, Any]:
    """A TOML file's tables; `name` says which file in the errors.

    Raises:
        ConfigError: unreadable, or not TOML (`error` is what `loads` raises then).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {name}: {exc.strerror}") from None
    try:
        return loads(text)
    except error as exc:
        raise ConfigError(f"{name}: invalid TOML: {exc}") from None


def with_overrides(
    config: Config, listen: list[str] | None = None, workers: str | None = None
) -> Config:
    """Apply command-line overrides (they win over the file)."""
    if listen:
        parsed = tuple(parse_listen(item, "--listen") for item in listen)
        config = replace(config, listen=parsed)
    if workers is not None:
        value: object = workers if workers == "auto" else _int_or_text(workers)
        config = replace(config, workers=_parse_workers(value))
    check_open_proxy(config)
    return config


def _int_or_text(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text
