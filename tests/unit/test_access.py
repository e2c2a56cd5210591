"""Access rules, the open-proxy guard and the per-worker limits: pure policy."""

from __future__ import annotations

import pytest

from socksd import access
from socksd.access import ClientPolicy, DestinationPolicy, ip_key, make_rule
from socksd.config import load_config, parse_config, with_overrides
from socksd.errors import ConfigError
from socksd.passwords import hash_password
from workers.counters import WorkerCounters
from workers.limits import Limits


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []

    def warning(self, event: str, **kw: object) -> None:
        self.lines.append((event, kw))


def _cfg(text: str):
    import tomllib

    return parse_config(tomllib.loads(text), "<test>")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("127.0.0.1", (4, 0x7F000001)),
        ("::ffff:127.0.0.1", (4, 0x7F000001)),  # mapped: checked as the IPv4 address
        ("::ffff:7f00:1", (4, 0x7F000001)),
        ("64:ff9b::a00:1", (4, 0x0A000001)),  # NAT64
        ("::1", (6, 1)),
        ("::", (6, 0)),
        ("fe80::1%eth0", None),  # a scope is not an address here: callers deny
        ("127.1", None),  # only canonical text: shorthand comes resolved or not at all
        ("01.2.3.4", None),
        ("example.com", None),
    ],
)
def test_ip_key_forms(text, key):
    assert ip_key(text) == key


DEFAULT_DENIED = [
    "0.0.0.0",
    "0.1.2.3",
    "127.0.0.1",
    "127.255.255.254",
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.0.1",
    "100.64.0.1",
    "100.127.255.255",
    "169.254.169.254",
    "224.0.0.1",
    "239.255.255.250",
    "255.255.255.255",
    "240.0.0.1",
    "::",
    "::1",
    "::127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::127.0.0.1",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "fec0::1",
    "ff02::1",
]


@pytest.mark.parametrize("ip", DEFAULT_DENIED)
def test_default_denials(ip):
    policy = DestinationPolicy([], [])
    verdict = policy.check(ip, 80, "203.0.113.1")
    assert verdict is not None and verdict.rule.startswith("default:")


@pytest.mark.parametrize(
    "ip", ["8.8.8.8", "172.32.0.1", "100.128.0.1", "2001:4860:4860::8888", "::ffff:8.8.8.8"]
)
def test_public_addresses_allowed(ip):
    assert DestinationPolicy([], []).check(ip, 443, "203.0.113.1") is None


def test_unparsable_is_denied():
    assert DestinationPolicy([], []).check("fe80::1%eth0", 80, "1.2.3.4").rule == (
        "unparsable_address"
    )


def test_operator_rules_first_match_then_defaults():
    rules = [
        make_rule("deny", ["127.0.0.1/32"], [(22, 22)], "access.destinations[0]"),
        make_rule("allow", ["127.0.0.0/8"], [], "access.destinations[1]"),
        make_rule("deny", [], [(25, 25)], "access.destinations[2]"),
    ]
    policy = DestinationPolicy(rules, [])
    assert policy.check("127.0.0.1", 22, "x").rule == "access.destinations[0]"
    assert policy.check("127.0.0.1", 80, "x") is None  # hole opened deliberately
    assert policy.check("::ffff:127.0.0.1", 80, "x") is None  # same address, mapped
    assert policy.check("8.8.8.8", 25, "x").rule == "access.destinations[2]"
    assert policy.check("10.0.0.1", 80, "x").rule == "default:private"
    # A user's rules come first, and the cache keeps users apart.
    user = (make_rule("deny", ["127.0.0.0/8"], [], "access.users.u.destinations[0]"),)
    assert policy.check("127.0.0.1", 80, "x", user).rule == "access.users.u.destinations[0]"
    assert policy.check("127.0.0.1", 80, "x") is None


def test_own_listeners_always_denied():
    allow_all = [make_rule("allow", [], [], "access.destinations[0]")]
    policy = DestinationPolicy(allow_all, [("127.0.0.1", 1080), ("0.0.0.0", 1081)])
    assert policy.check("127.0.0.1", 1080, "127.0.0.1").rule == "own_listener"
    assert policy.check("127.0.0.1", 1079, "127.0.0.1") is None
    # Wildcard listener: loopback, unspecified and the ingress IP on that port.
    assert policy.check("127.0.0.5", 1081, "203.0.113.7").rule == "own_listener"
    assert policy.check("0.0.0.0", 1081, "203.0.113.7").rule == "own_listener"
    assert policy.check("203.0.113.7", 1081, "203.0.113.7").rule == "own_listener"
    assert policy.check("203.0.113.8", 1081, "203.0.113.7") is None


def test_client_policy():
    loopback_only = ClientPolicy([], loopback_only=True)
    assert loopback_only.allows("127.0.0.1") and loopback_only.allows("::1")
    assert not loopback_only.allows("192.0.2.1")
    rules = [
        make_rule("deny", ["10.0.0.5"], [], "access.clients[0]"),
        make_rule("allow", ["10.0.0.0/8"], [], "access.clients[1]"),
    ]
    ruled = ClientPolicy(rules, loopback_only=False)
    assert ruled.allows("10.1.1.1")
    assert not ruled.allows("10.0.0.5")
    assert not ruled.allows("127.0.0.1"), "with rules, no match means deny"
    assert ClientPolicy([], loopback_only=False).allows("198.51.100.1")


# -- config -------------------------------------------------------------------------------


def test_embedded_default_is_loopback_and_accepted():
    config = load_config()
    assert config.loopback_only and config.access.destinations == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('listen = ["0.0.0.0:1080"]\n', "open proxy"),
        ('listen = ["[::]:1080"]\n', "open proxy"),
        ('[[access.destinations]]\naction = "permit"\n', 'must be "allow" or "deny"'),
        ('[[access.destinations]]\naction = "deny"\nto = ["10.0.0.0/33"]\n', "to[0]"),
        ('[[access.destinations]]\naction = "deny"\nports = ["90-80"]\n', "ports[0]"),
        ('[[access.destinations]]\naction = "deny"\nports = [70000]\n', "ports[0]"),
        ('[[access.destinations]]\naction = "deny"\nfrom = ["1.2.3.4"]\n', "unknown key"),
        ('[[access.clients]]\naction = "allow"\nto = ["1.2.3.4"]\n', "unknown key"),
        ("[access.users.nobody]\nmax_tunnels = 1\n", "no such user"),
        ("[limits]\nmax_tunnels = -1\n", "limits.max_tunnels"),
        ("[limits]\nuser_rate = -1\n", "limits.user_rate"),
        ("[limits]\nmax_tunnel = 1\n", "unknown key"),
    ],
)
def test_config_errors_name_the_key(text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _cfg(text)


def test_open_proxy_ways_out():
    open_text = 'listen = ["0.0.0.0:1080"]\n'
    assert _cfg(open_text + "[access]\nallow_open_proxy = true\n").access.allow_open_proxy
    _cfg(open_text + '[[access.clients]]\naction = "allow"\nfrom = ["192.0.2.0/24"]\n')
    h = hash_password("x")
    _cfg(open_text + f'[auth]\nmethod = "password"\n[auth.users]\nu = "{h}"\n')
    with pytest.raises(ConfigError, match="open proxy"):
        with_overrides(load_config(), listen=["0.0.0.0:1080"])


def test_worker_share_of_global_limit():
    config = _cfg("workers = 3\n[limits]\nmax_tunnels = 10\n")
    assert config.worker_tunnel_limit() == 4  # rounded up
    config = _cfg("workers = 3\n[limits]\nmax_tunnels = 10\nmax_tunnels_per_worker = 2\n")
    assert config.worker_tunnel_limit() == 2
    assert _cfg("workers = 2\n").worker_tunnel_limit() == 0


# -- limits -------------------------------------------------------------------------------


def _limits(text: str) -> tuple[Limits, WorkerCounters, _Log]:
    counters, log = WorkerCounters(), _Log()
    return Limits(_cfg(text), log, counters), counters, log


def test_nothing_limited_asks_nothing():
    limits, _, _ = _limits("")
    assert not limits.claims_needed and limits.max_tunnels == 0


def test_client_ip_claims_and_release():
    limits, counters, log = _limits("[limits]\nmax_tunnels_per_client_ip = 2\n")
    a, b = limits.claim("10.0.0.1", None, 0.0), limits.claim("10.0.0.1", None, 0.0)
    assert not isinstance(a, str) and not isinstance(b, str)
    assert limits.claim("10.0.0.1", None, 0.0) == "client_ip_tunnel_limit"
    assert not isinstance(limits.claim("10.0.0.2", None, 0.0), str)
    a.release()
    a.release()  # idempotent: a double release must not free a second place
    assert not isinstance(limits.claim("10.0.0.1", None, 0.0), str)
    assert limits.claim("10.0.0.1", None, 0.0) == "client_ip_tunnel_limit"
    assert counters.refused == {"client_ip_tunnel_limit": 2}
    # Rate-limited log: one line for the two refusals within the interval.
    assert [e for e, _ in log.lines] == ["limit_reached"]


def test_user_token_bucket():
    h = hash_password("x")
    text = f'[auth]\nmethod = "password"\n[auth.users]\nu = "{h}"\n'
    text += "[limits]\nuser_rate = 2\nuser_burst = 3\n"
    limits, _, _ = _limits(text)
    got = [limits.claim("10.0.0.1", "u", 100.0) for _ in range(4)]
    assert [isinstance(c, str) for c in got] == [False, False, False, True]
    assert isinstance(limits.claim("10.0.0.1", "u", 100.4), str)  # 0.8 token
    assert not isinstance(limits.claim("10.0.0.1", "u", 100.5), str)  # 1 token after 0.5 s


def test_auth_backoff_doubles_and_is_capped():
    limits, _, _ = _limits("[limits]\nauth_failures = 2\nauth_backoff = 1\nauth_backoff_max = 3\n")
    ip = "192.0.2.1"
    assert limits.auth_delay(ip, 0.0) == 0.0
    delays = []
    for i in range(5):
        limits.auth_failed(ip, float(i))
        delays.append(limits.auth_delay(ip, float(i)))
    assert delays == [0.0, 1.0, 2.0, 3.0, 3.0]
    assert limits.auth_delay("192.0.2.2", 5.0) == 0.0
    assert limits.auth_delay(ip, 5.0 + 601) == 0.0  # forgotten after a quiet while
    limits.auth_failed(ip, 700.0)
    limits.auth_succeeded(ip)
    assert limits.auth_delay(ip, 700.0) == 0.0


def test_is_loopback():
    assert access.is_loopback("127.0.0.2") and access.is_loopback("::1")
    assert not access.is_loopback("0.0.0.0") and not access.is_loopback("::")


def test_socks4_on_a_public_listener_needs_client_rules():
    h = hash_password("x")
    text = (
        'listen = ["0.0.0.0:1080"]\nprotocols = ["socks5", "socks4"]\n'
        f'[auth]\nmethod = "password"\n[auth.users]\nu = "{h}"\n'
    )
    with pytest.raises(ConfigError, match="SOCKS4 has no password"):
        _cfg(text)
    _cfg(text + '[[access.clients]]\naction = "allow"\nfrom = ["192.0.2.0/24"]\n')
    _cfg(text + "[access]\nallow_open_proxy = true\n")
    _cfg(text.replace("0.0.0.0", "127.0.0.1"))
