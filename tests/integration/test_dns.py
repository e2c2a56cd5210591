"""Name resolution on the worker's loop (c-ares), proved against a real DNS server.

Every socksd here asks `tests/dnsserver.py` on loopback (`resolver.nameservers`), whose
query counters show what reached the wire; tunnels go to an echo target on loopback
through names the test gives records for. What is checked: TTLs honoured (one query
per family while an answer is fresh), negative answers cached, concurrent lookups of
one name coalesced, failures answered 0x04 with their own reasons within
`resolver.timeout`, serve-stale (RFC 8767), CNAME chains, the family picked by the
ingress address, /etc/hosts, destination rules on cached answers, and that a slow DNS
server does not slow tunnels to IP literals (no blocking call on the loop).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dnsserver import DNSServer
from tests.integration.conftest import ipv6_available
from tests.integration.helpers import (
    TIMEOUT,
    Socksd,
    TargetServer,
    echo,
    open_tunnel,
    recv_exact,
)

STRICT = bool(os.environ.get("SOCKSD_TEST_STRICT"))


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer() as server:
        yield server


def _config(dns: DNSServer, listen: str = "127.0.0.1:0", **resolver: Any) -> str:
    settings = {"nameservers": [dns.nameserver], **resolver}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    return (
        f'listen = ["{listen}"]\nworkers = 1\n'
        "[timeouts]\nhandshake = 5.0\nconnect = 5.0\n"
        f"[resolver]\n{lines}\n"
    )


def _tunnel(proxy: Socksd, host: str, port: int) -> int:
    """One tunnel to `host`: the reply code; on success 5 bytes echoed first."""
    sock, (rep, _, _) = open_tunnel(proxy.address, host, port)
    try:
        if rep == 0:
            sock.sendall(b"hello")
            assert recv_exact(sock, 5) == b"hello"
        return rep
    finally:
        sock.close()


def _stats(proxy: Socksd) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "socksd", "stats", "--json", "--socket", str(proxy.control_path)],
        capture_output=True,
        timeout=TIMEOUT,
        check=True,
    )
    return json.loads(out.stdout)


def _dns_stats(proxy: Socksd, settled: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """`dns` of `socksd stats --json` once `settled(dns)` holds, or after TIMEOUT
    (workers report every second)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        dns = _stats(proxy)["dns"]
        if settled(dns) or time.monotonic() > deadline:
            return dns
        time.sleep(0.2)


@pytest.fixture
def target() -> Iterator[TargetServer]:
    server = TargetServer(echo)
    yield server
    server.close()


def test_a_fresh_answer_costs_one_query_per_family_until_its_ttl(spawn, dns, target):
    dns.add("app.test", "A", "127.0.0.1", ttl=2)
    dns.add("app.test", "AAAA", "::1", ttl=2)
    proxy = spawn(_config(dns, min_ttl=1, max_ttl=300))
    for _ in range(50):
        assert _tunnel(proxy, "app.test", target.port) == 0
    assert dns.queries("app.test", "A") == 1
    assert dns.queries("app.test", "AAAA") == 1
    time.sleep(2.2)  # the answer's TTL (the test's own wait, not socksd's)
    for _ in range(10):
        assert _tunnel(proxy, "app.test", target.port) == 0
    assert dns.queries("app.test", "A") == 2
    assert dns.queries("app.test", "AAAA") == 2
    stats = _dns_stats(proxy, lambda d: d["hits"] >= 58)
    assert stats["misses"] == 2 and stats["hits"] == 58 and stats["lookups"] == 2


def test_max_ttl_clamps_and_min_ttl_floors(spawn, dns, target):
    dns.add("zero.test", "A", "127.0.0.1", ttl=0)
    proxy = spawn(_config(dns, min_ttl=2, max_ttl=300))
    for _ in range(20):
        assert _tunnel(proxy, "zero.test", target.port) == 0
    # TTL 0 would mean a query per tunnel; min_ttl keeps the answer 2 s.
    assert dns.queries("zero.test", "A") == 1


def test_negative_answers_are_cached_for_negative_ttl(spawn, dns):
    dns.set_negative_ttl("missing.test", 1)  # the SOA's: c-ares keeps NXDOMAIN that long
    proxy = spawn(_config(dns, negative_ttl=1.5))
    for _ in range(10):
        assert _tunnel(proxy, "missing.test", 80) == 0x04
    assert dns.queries("missing.test", "A") == 1
    closed = proxy.wait_count("tunnel_closed", 10)
    assert {(e["reply"], e["reason"]) for e in closed} == {(4, "dns_nxdomain")}
    time.sleep(1.7)
    assert _tunnel(proxy, "missing.test", 80) == 0x04
    assert dns.queries("missing.test", "A") == 2


def test_nodata_and_the_wrong_family_have_their_own_reasons(spawn, dns):
    dns.add("v6-only.test", "AAAA", "2001:db8::1")
    dns.add("nodata.test", "TXT", "v=spf1 -all")  # exists: NODATA for A and AAAA alike
    proxy = spawn(_config(dns))
    # An IPv6-only name through an IPv4 ingress: never another source IP (README).
    assert _tunnel(proxy, "v6-only.test", 80) == 0x04
    closed = proxy.wait_for("tunnel_closed", lambda e: e["target"].startswith("v6-only"))
    assert closed["reason"] == "no_egress_for_family"
    assert _tunnel(proxy, "nodata.test", 80) == 0x04
    closed = proxy.wait_for("tunnel_closed", lambda e: e["target"].startswith("nodata"))
    assert closed["reason"] == "dns_nodata"


def test_two_hundred_concurrent_tunnels_to_one_new_name_send_one_query_per_family(
    spawn, dns, target
):
    dns.add("burst.test", "A", "127.0.0.1", ttl=60)
    dns.set_delay("burst.test", 0.5)  # every tunnel arrives while the lookup is under way
    proxy = spawn(_config(dns))
    with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
        replies = list(pool.map(lambda _: _tunnel(proxy, "burst.test", target.port), range(200)))
    assert replies == [0] * 200
    assert dns.queries("burst.test", "A") == 1
    assert dns.queries("burst.test", "AAAA") == 1
    stats = _dns_stats(proxy, lambda d: d["coalesced"] + d["misses"] + d["hits"] >= 200)
    assert stats["lookups"] == 1
    assert stats["coalesced"] + stats["misses"] + stats["hits"] == 200
    assert stats["coalesced"] >= 100, stats  # most arrived within the 0.5 s delay


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda d: d.set_rcode("fail.test", 2), "dns_servfail"),
        (lambda d: d.drop("fail.test"), "dns_timeout"),
    ],
)
def test_servfail_and_timeout_answer_0x04_within_resolver_timeout(spawn, dns, setup, reason):
    setup(dns)
    proxy = spawn(_config(dns, timeout=1.0, tries=2))
    started = time.monotonic()
    assert _tunnel(proxy, "fail.test", 80) == 0x04
    took = time.monotonic() - started
    assert took < 1.0 + 0.5, took
    closed = proxy.wait_for("tunnel_closed", lambda e: e["target"].startswith("fail.test"))
    assert (closed["reply"], closed["reason"]) == (4, reason)
    assert _dns_stats(proxy, lambda d: d["failures"])["failures"] == {reason: 1}


@pytest.mark.parametrize("failure", ["servfail", "timeout"])
def test_an_expired_answer_is_served_stale_when_its_refresh_fails(spawn, dns, target, failure):
    dns.add("stale.test", "A", "127.0.0.1", ttl=1)
    proxy = spawn(_config(dns, min_ttl=1, stale_ttl=30, timeout=1.0))
    assert _tunnel(proxy, "stale.test", target.port) == 0
    if failure == "servfail":
        dns.set_rcode("stale.test", 2)
    else:
        dns.drop("stale.test")
    time.sleep(1.3)  # past the TTL
    assert _tunnel(proxy, "stale.test", target.port) == 0
    assert dns.queries("stale.test", "A") >= 2  # it did try to refresh
    stats = _dns_stats(proxy, lambda d: d["stale"] >= 1 and d["failures"])
    assert stats["stale"] == 1
    assert stats["failures"] == {f"dns_{failure}": 1}


def test_no_stale_answer_past_stale_ttl(spawn, dns):
    dns.add("gone.test", "A", "127.0.0.1", ttl=1)
    proxy = spawn(_config(dns, min_ttl=1, stale_ttl=1, timeout=1.0))
    target = TargetServer(echo)
    try:
        assert _tunnel(proxy, "gone.test", target.port) == 0
        dns.set_rcode("gone.test", 2)
        time.sleep(2.3)  # past TTL + stale_ttl
        assert _tunnel(proxy, "gone.test", target.port) == 0x04
    finally:
        target.close()


def test_cname_chain_is_followed(spawn, dns, target):
    dns.add("www.chain.test", "CNAME", "edge.chain.test", ttl=60)
    dns.add("edge.chain.test", "CNAME", "origin.chain.test", ttl=60)
    dns.add("origin.chain.test", "A", "127.0.0.1", ttl=60)
    proxy = spawn(_config(dns))
    assert _tunnel(proxy, "www.chain.test", target.port) == 0
    closed = proxy.wait_for("tunnel_closed", lambda e: e["target"].startswith("www.chain"))
    assert closed["egress"].startswith("127.0.0.1:")


def test_both_families_through_an_ipv4_ingress_connect_over_ipv4(spawn, dns, target):
    dns.add("dual.test", "A", "127.0.0.1")
    dns.add("dual.test", "AAAA", "::1")
    proxy = spawn(_config(dns))
    assert _tunnel(proxy, "dual.test", target.port) == 0
    assert target.peers and target.peers[-1][0] == "127.0.0.1"


def test_aaaa_only_name_through_an_ipv6_ingress(spawn, dns):
    if not ipv6_available():
        if STRICT:
            pytest.fail("IPv6 loopback is needed (SOCKSD_TEST_STRICT)")
        pytest.skip("no IPv6 loopback")
    target6 = TargetServer(echo, host="::1")
    try:
        dns.add("v6.test", "AAAA", "::1")
        proxy = spawn(_config(dns, listen="[::1]:0"))
        assert _tunnel(proxy, "v6.test", target6.port) == 0
        assert target6.peers[-1][0] == "::1"
    finally:
        target6.close()


def test_localhost_comes_from_etc_hosts_without_a_query(spawn, dns, target):
    proxy = spawn(_config(dns))
    assert _tunnel(proxy, "localhost", target.port) == 0
    assert dns.queries("localhost") == 0


def test_a_cached_loopback_answer_is_denied_every_time(tmp_path, dns, target):
    dns.add("internal.test", "A", "127.0.0.1", ttl=300)
    proxy = Socksd(_config(dns), tmp_path, allow_loopback_targets=False)
    try:
        for _ in range(3):
            assert _tunnel(proxy, "internal.test", target.port) == 0x02
        assert dns.queries("internal.test", "A") == 1  # answers 2 and 3 came from the cache
        denied = proxy.wait_count("destination_denied", 3)
        assert {e["rule"] for e in denied} == {"default:loopback"}
        assert not target.peers
    finally:
        proxy.stop()


def test_a_slow_dns_server_does_not_slow_tunnels_to_ip_literals(spawn, dns, target):
    dns.add("slow.test", "A", "127.0.0.1")
    dns.set_delay(None, 2.0)
    proxy = spawn(_config(dns, timeout=4.0))

    def ip_tunnel_seconds() -> float:
        started = time.monotonic()
        assert _tunnel(proxy, "127.0.0.1", target.port) == 0
        return time.monotonic() - started

    baseline = sorted(ip_tunnel_seconds() for _ in range(20))
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        slow = [pool.submit(_tunnel, proxy, f"n{i}.slow.test", target.port) for i in range(20)]
        time.sleep(0.2)  # the 20 lookups are now waiting on the server
        during = sorted(ip_tunnel_seconds() for _ in range(20))
        assert all(not f.done() for f in slow), "the names were answered before the delay"
        results = [f.result(timeout=TIMEOUT) for f in slow]
    assert results == [4] * 20  # n*.slow.test: NXDOMAIN after 2 s
    # The loop kept serving: IP tunnels during 20 pending lookups take as long as before
    # (a blocked loop would add up to the 2 s delay).
    assert during[len(during) // 2] < baseline[len(baseline) // 2] + 0.05, (baseline, during)
    assert during[-1] < 0.5, during


def test_resolver_backend_system_still_works(spawn, target):
    proxy = spawn('listen = ["127.0.0.1:0"]\nworkers = 1\n[resolver]\nbackend = "system"\n')
    assert _tunnel(proxy, "localhost", target.port) == 0


def test_stats_and_metrics_show_the_dns_figures(spawn, dns, target, tmp_path: Path):
    dns.add("m.test", "A", "127.0.0.1")
    proxy = spawn(_config(dns))
    for _ in range(5):
        assert _tunnel(proxy, "m.test", target.port) == 0
    assert _tunnel(proxy, "nx.test", target.port) == 0x04
    stats = _dns_stats(proxy, lambda d: d["hits"] >= 4 and d["failures"])
    assert stats["lookups"] == 2 and stats["hits"] == 4
    assert stats["failures"] == {"dns_nxdomain": 1}
    assert stats["latency_p50_ms"] is not None and stats["latency_p99_ms"] is not None
    table = subprocess.run(
        [sys.executable, "-m", "socksd", "stats", "--socket", str(proxy.control_path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout
    assert "dns lookups 2  hits 4" in table
