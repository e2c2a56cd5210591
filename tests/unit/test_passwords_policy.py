"""Password hashes and pure egress policy."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from socksd import policy
from socksd.config import EgressMapping
from socksd.passwords import hash_password, parse_hash, verify_password


def test_hash_roundtrip_and_salt():
    a, b = hash_password("secret"), hash_password("secret")
    assert a != b, "each hash has its own salt"
    assert a.startswith("scrypt$16384$8$1$")
    assert verify_password(b"secret", parse_hash(a))
    assert not verify_password(b"Secret", parse_hash(a))
    assert parse_hash(a).encode() == a


@pytest.mark.parametrize(
    "text",
    [
        "",
        "secret",
        "scrypt$1$8$1$AAAA$AAAA",
        "scrypt$16384$8$1$!!$AAAA",
        "bcrypt$1$2$3$4$5",
        "scrypt$16384$8$1$$AAAA",
        "scrypt$3$8$1$AAAA$AAAA",
    ],
)
def test_bad_hashes_are_rejected(text):
    with pytest.raises(ValueError):
        parse_hash(text)


def test_normalize_ip():
    assert policy.normalize_ip("::ffff:127.0.0.2") == "127.0.0.2"
    assert policy.normalize_ip("0:0::1") == "::1"
    assert policy.normalize_ip("fe80::1%eth0") == "fe80::1"
    assert policy.normalize_ip("10.0.0.1") == "10.0.0.1"


def test_egress_source_never_crosses_family():
    pol = policy.EgressPolicy()
    assert pol.source("192.0.2.1", socket.AF_INET) == "192.0.2.1"
    assert pol.source("192.0.2.1", socket.AF_INET6) is None
    assert pol.source("2001:db8::1", socket.AF_INET6) == "2001:db8::1"
    assert pol.source("2001:db8::1", socket.AF_INET) is None


def _mapping(ingress, ipv4=None, ipv6=None):
    return EgressMapping(ipaddress.ip_network(ingress), ipv4, ipv6)


def test_egress_map_longest_prefix_per_family():
    pol = policy.EgressPolicy(
        [
            _mapping("192.0.2.0/24", ipv6="2001:db8::100"),
            _mapping("192.0.2.7/32", ipv4="198.51.100.7", ipv6="2001:db8::7"),
        ]
    )
    # /24: IPv6 targets get the mapped source; IPv4 keeps the ingress IP.
    assert pol.source("192.0.2.1", socket.AF_INET) == "192.0.2.1"
    assert pol.source("192.0.2.1", socket.AF_INET6) == "2001:db8::100"
    # /32 wins over /24 for both families.
    assert pol.source("192.0.2.7", socket.AF_INET) == "198.51.100.7"
    assert pol.source("192.0.2.7", socket.AF_INET6) == "2001:db8::7"
    # Outside every mapping: the ingress rule.
    assert pol.source("203.0.113.1", socket.AF_INET6) is None


def test_order_candidates_keeps_ingress_family_in_resolver_order():
    v4a = (socket.AF_INET, ("192.0.2.10", 80))
    v6 = (socket.AF_INET6, ("2001:db8::10", 80))
    v4b = (socket.AF_INET, ("192.0.2.11", 80))
    pol = policy.EgressPolicy()
    assert pol.order_candidates([v6, v4a, v4b], "192.0.2.1") == [
        ("192.0.2.1", socket.AF_INET, ("192.0.2.10", 80)),
        ("192.0.2.1", socket.AF_INET, ("192.0.2.11", 80)),
    ]
    assert pol.order_candidates([v4a], "2001:db8::1") == []
    mapped = policy.EgressPolicy([_mapping("192.0.2.0/24", ipv6="2001:db8::100")])
    assert mapped.order_candidates([v6, v4a], "192.0.2.1") == [
        ("192.0.2.1", socket.AF_INET, ("192.0.2.10", 80)),
        ("2001:db8::100", socket.AF_INET6, ("2001:db8::10", 80)),
    ]
