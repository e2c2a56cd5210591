"""Password hashes and pure egress policy."""

from __future__ import annotations

import socket

import pytest

from socksd import policy
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
    assert policy.egress_source("192.0.2.1", socket.AF_INET) == "192.0.2.1"
    assert policy.egress_source("192.0.2.1", socket.AF_INET6) is None
    assert policy.egress_source("2001:db8::1", socket.AF_INET6) == "2001:db8::1"
    assert policy.egress_source("2001:db8::1", socket.AF_INET) is None


def test_order_candidates_keeps_ingress_family_in_resolver_order():
    v4a = (socket.AF_INET, ("192.0.2.10", 80))
    v6 = (socket.AF_INET6, ("2001:db8::10", 80))
    v4b = (socket.AF_INET, ("192.0.2.11", 80))
    ordered = policy.order_candidates([v6, v4a, v4b], "192.0.2.1")
    assert ordered == [
        ("192.0.2.1", socket.AF_INET, ("192.0.2.10", 80)),
        ("192.0.2.1", socket.AF_INET, ("192.0.2.11", 80)),
    ]
    assert policy.order_candidates([v4a], "2001:db8::1") == []
