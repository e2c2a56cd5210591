"""Config parsing: good and bad TOML, defaults, overrides, dotted-key errors."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

import pytest

from socksd.config import (
    Config,
    LimitsConfig,
    ListenAddress,
    load_config,
    parse_config,
    parse_listen,
    with_overrides,
)
from socksd.errors import ConfigError
from socksd.passwords import hash_password

REPO = Path(__file__).resolve().parents[2]


def _parse(text: str) -> Config:
    return parse_config(tomllib.loads(text), "<test>")


def test_embedded_default():
    config = load_config(None)
    assert config.listen == (ListenAddress("127.0.0.1", 1080),)
    assert config.workers == "auto"
    assert config.auth.method == "none"
    assert (config.timeouts.handshake, config.timeouts.connect, config.timeouts.idle) == (
        10.0,
        10.0,
        300.0,
    )
    assert config.worker_count >= 1


def test_example_config_is_valid():
    config = load_config(REPO / "etc" / "socksd.toml")
    assert config.listen == (ListenAddress("127.0.0.1", 1080),)
    assert config.log.level == "info"
    # The documented defaults are the real ones.
    assert config.limits == LimitsConfig() and not config.access.allow_open_proxy


def test_try_local_config_opens_loopback_destinations_only():
    config = load_config(REPO / "etc" / "try-local.toml")
    (rule,) = config.access.destinations
    assert rule.action == "allow" and config.loopback_only


def test_full_config():
    h = hash_password("pw")
    config = _parse(
        'listen = ["0.0.0.0:1080", "[::1]:1081"]\nworkers = 3\n'
        "[timeouts]\nhandshake = 1\nconnect = 2.5\nidle = 60\n"
        f'[auth]\nmethod = "password"\n[auth.users]\nalice = "{h}"\n'
        '[log]\nlevel = "debug"\n[resolver]\nthreads = 2\n'
    )
    assert config.listen[1] == ListenAddress("::1", 1081)
    assert config.listen[1].family == socket.AF_INET6
    assert str(config.listen[1]) == "[::1]:1081"
    assert config.workers == 3 and config.worker_count == 3
    assert config.timeouts.connect == 2.5
    assert set(config.auth.users) == {"alice"}
    assert config.resolver.threads == 2


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('listen = ["127.0.0.1:1080"]\nlisten_typo = 1\n', "listen_typo"),
        ("[timeouts]\nconect = 3\n", "timeouts.conect"),
        ("[timeouts]\nconnect = 0\n", "timeouts.connect"),
        ('[timeouts]\nidle = "5"\n', "timeouts.idle"),
        ("[timeouts]\nhandshake = true\n", "timeouts.handshake"),
        ('listen = ["localhost:1080"]\n', "listen[0]"),
        ('listen = ["127.0.0.1:99999"]\n', "listen[0]"),
        ('listen = ["::1:1080"]\n', "listen[0]"),
        ("listen = []\n", "listen"),
        ('listen = ["127.0.0.1:1", "127.0.0.1:1"]\n', "listen"),
        ("workers = 0\n", "workers"),
        ('workers = "many"\n', "workers"),
        ('[auth]\nmethod = "gssapi"\n', "auth.method"),
        ('[auth]\nmethod = "password"\n', "auth.users"),
        ('[auth.users]\nbob = "plaintext"\n', "auth.users.bob"),
        ('[log]\nlevel = "loud"\n', "log.level"),
        ("[resolver]\nthreads = 0\n", "resolver.threads"),
        ("timeouts = 5\n", "timeouts"),
    ],
)
def test_bad_values_name_the_dotted_key(text, key):
    with pytest.raises(ConfigError) as err:
        _parse(text)
    assert str(err.value).startswith(f"{key}:"), str(err.value)
    assert err.value.exit_code == 2


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = [\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_overrides_win_over_file():
    config = with_overrides(load_config(None), ["[::1]:2000", "127.0.0.2:2001"], "2")
    assert config.listen == (ListenAddress("::1", 2000), ListenAddress("127.0.0.2", 2001))
    assert config.workers == 2
    assert with_overrides(config, None, "auto").workers == "auto"
    with pytest.raises(ConfigError, match="^--listen:"):
        with_overrides(config, ["nope"], None)
    with pytest.raises(ConfigError, match="^workers:"):
        with_overrides(config, None, "-1")


def test_parse_listen_forms():
    assert parse_listen("127.0.0.1:0") == ListenAddress("127.0.0.1", 0)
    assert parse_listen("[::]:1080") == ListenAddress("::", 1080)
    assert parse_listen("[0:0::1]:5") == ListenAddress("::1", 5)


def test_udp_behind_nat_settings():
    base = {
        "listen": ["127.0.0.1:1080", "10.0.0.5:1080", "[::]:1080"],
        "access": {"clients": [{"action": "allow", "from": ["10.0.0.0/8"]}]},
    }
    config = parse_config(
        {
            **base,
            "udp": {
                "advertise": [
                    {"ingress": "10.0.0.5", "address": "203.0.113.5"},
                    {"ingress": "fd00::5", "address": "2001:db8::5"},
                ],
                "port_range": [40000, 40999],
            },
            "limits": {"max_udp": 10, "max_udp_per_user": 2},
            "workers": 4,
        },
        "t",
    )
    assert config.udp.advertise == {"10.0.0.5": "203.0.113.5", "fd00::5": "2001:db8::5"}
    assert config.udp.port_range == (40000, 40999)
    assert config.worker_udp_limit() == 3  # 10 over 4 workers, rounded up
    bad = [
        ({"advertise": [{"ingress": "10.0.0.5", "address": "2001:db8::5"}]}, "IPv4"),
        ({"advertise": [{"ingress": "10.0.0.5", "address": "1.2.3.4"}] * 2}, "twice"),
        ({"advertise": [{"ingress": "10.0.0.5"}]}, "address"),
        ({"port_range": [5, 4]}, "port_range"),
        ({"port_range": [0, 4]}, "port_range"),
        ({"port": 1}, "udp.port: unknown key"),
        ({"advertise": [{"ingress": "10.0.0.6", "address": "1.2.3.4"}]}, "not a listen"),
    ]
    for udp, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, "udp": udp}, "t")


def test_users_known_by_their_address():
    from socksd.whitelist import ClientUsers

    h = hash_password("x")
    base = {"listen": ["192.0.2.1:1080"]}  # not loopback: the open-proxy guard runs
    config = parse_config(
        {
            **base,
            "auth": {"method": "ip"},
            "access": {
                "users": {
                    "alice": {"clients": ["203.0.113.0/24"], "ingress": ["192.0.2.1"]},
                    "bob": {"clients": ["2001:db8::/64", "198.51.100.7"]},
                }
            },
        },
        "t",
    )
    users = ClientUsers({n: ua.clients for n, ua in config.access.users.items()})
    assert users.user_of("203.0.113.77") == "alice"
    assert users.user_of("::ffff:203.0.113.1") == "alice"
    assert users.user_of("198.51.100.7") == "bob" and users.user_of("198.51.100.8") is None
    assert users.user_of("2001:db8::1") == "bob" and users.user_of("2001:db9::1") is None
    bad = [
        (
            {"method": "ip"},
            {"users": {"a": {"clients": ["10.0.0.0/8"]}, "b": {"clients": ["10.1.0.0/16"]}}},
            "overlap",
        ),
        ({"method": "ip"}, {}, "no access.users.NAME.clients"),
        (
            {"method": "password", "users": {"a": h}},
            {"users": {"a": {"clients": ["10.0.0.0/8"]}}},
            'needs auth.method "ip"',
        ),
        (
            {"method": "ip_and_password", "users": {"a": h}},
            {"users": {"b": {"clients": ["10.0.0.0/8"]}}},
            "needs its password too",
        ),
        ({"method": "ip_or_password"}, {"users": {"b": {"clients": ["10.0.0.0/8"]}}}, "password"),
        ({"method": "token"}, {}, "must be one of"),
    ]
    for auth, access, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, "auth": auth, "access": access}, "t")


def test_a_users_own_networks_may_nest_and_socks4_userids_end_under_ip_methods():
    from socksd.access import ClientPolicy, DestinationPolicy, Net
    from socksd.revocation import Grant, revoked_by
    from socksd.whitelist import ClientUsers

    users = ClientUsers({"a": [Net.parse("10.0.0.0/8"), Net.parse("10.1.0.0/16")]})
    assert users.user_of("10.200.0.1") == "a" and users.user_of("10.1.2.3") == "a"
    config = parse_config(
        {
            "listen": ["127.0.0.1:1080"],
            "protocols": ["socks5", "socks4"],
            "auth": {"method": "ip_or_password", "users": {"a": hash_password("x")}},
            "access": {"users": {"a": {"clients": ["10.0.0.0/8"]}}},
        },
        "t",
    )
    clients = ClientPolicy(config.access.clients, loopback_only=False)
    destinations = DestinationPolicy(config.access.destinations, [("127.0.0.1", 1080)])
    whitelist = ClientUsers({"a": config.access.users["a"].clients})
    # A SOCKS4 tunnel named "a" by its USERID under "password", after the switch:
    userid = Grant("socks4", "192.0.2.9", "127.0.0.1", "a", None, None)
    assert revoked_by(userid, config, clients, destinations, whitelist) == "auth.method"
    same = Grant("socks4", "10.0.0.9", "127.0.0.1", "a", None, None)
    assert revoked_by(same, config, clients, destinations, whitelist) is None
