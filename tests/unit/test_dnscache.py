"""The per-worker DNS cache and the hosts-file table: pure, driven by a fake clock."""

from __future__ import annotations

import socket

from workers.dnscache import DnsCache
from workers.hostsfile import parse

V4 = ((socket.AF_INET, "192.0.2.1"),)


def _cache(**kw: float) -> DnsCache:
    settings = {"size": 3, "min_ttl": 1.0, "max_ttl": 60.0, "negative_ttl": 5.0, "stale_ttl": 30.0}
    settings.update(kw)
    return DnsCache(**settings)  # type: ignore[arg-type]


def test_a_positive_answer_is_fresh_for_its_ttl() -> None:
    c = _cache()
    c.answer("a.test", V4, 10, now=100.0)
    assert c.fresh("a.test", 109.9) is not None
    assert c.fresh("a.test", 110.0) is None


def test_ttls_are_clamped_to_min_and_max() -> None:
    c = _cache(min_ttl=2.0, max_ttl=60.0)
    c.answer("zero.test", V4, 0, now=0.0)
    c.answer("long.test", V4, 86400, now=0.0)
    assert c.fresh("zero.test", 1.9) is not None and c.fresh("zero.test", 2.0) is None
    assert c.fresh("long.test", 59.9) is not None and c.fresh("long.test", 60.0) is None


def test_negative_answers_last_negative_ttl_and_are_never_stale() -> None:
    c = _cache(negative_ttl=5.0)
    entry = c.failure("nx.test", "dns_nxdomain", now=0.0)
    assert entry.reason == "dns_nxdomain" and entry.ips == ()
    assert c.fresh("nx.test", 4.9) is entry
    assert c.fresh("nx.test", 5.0) is None
    assert c.stale("nx.test", 5.0) is None


def test_an_expired_answer_stays_usable_as_stale_for_stale_ttl() -> None:
    c = _cache(stale_ttl=30.0)
    c.answer("s.test", V4, 10, now=0.0)
    assert c.stale("s.test", 10.0) is not None
    assert c.stale("s.test", 39.9) is not None
    assert c.stale("s.test", 40.0) is None


def test_a_negative_answer_replaces_a_positive_one() -> None:
    c = _cache()
    c.answer("gone.test", V4, 10, now=0.0)
    c.failure("gone.test", "dns_nxdomain", now=1.0)
    assert c.stale("gone.test", 20.0) is None


def test_the_least_recently_used_name_is_dropped_past_size() -> None:
    c = _cache(size=3)
    for i, name in enumerate(("a", "b", "c")):
        c.answer(name, V4, 60, now=float(i))
    assert c.fresh("a", 3.0) is not None  # "a" used: "b" is now the oldest
    c.answer("d", V4, 60, now=4.0)
    assert len(c) == 3
    assert c.fresh("b", 4.0) is None
    assert all(c.fresh(n, 4.0) is not None for n in ("a", "c", "d"))


def test_hosts_lines_of_one_name_merge_both_families_ipv4_first() -> None:
    table = parse(
        "# comment\n127.0.0.1 localhost\n::1 localhost ip6-localhost\n"
        "127.0.0.33 dual.test # trailing comment\n::1 Dual.Test\nnot-an-ip bad.test\n\n"
    )
    assert table["localhost"] == ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))
    assert table["dual.test"] == ((socket.AF_INET, "127.0.0.33"), (socket.AF_INET6, "::1"))
    assert table["ip6-localhost"] == ((socket.AF_INET6, "::1"),)
    assert "bad.test" not in table
