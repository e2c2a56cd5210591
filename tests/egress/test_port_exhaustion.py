"""socksd's egress at the kernel's edge, in namespaces with tiny ephemeral ranges.

The scenarios are the blog's (shared/seed) as corrected by shared/notes/port-binding.md:
capacity is P per (egress IP, target ip:port), exhaustion is connect() EADDRNOTAVAIL,
and a quad we closed stays unusable until TIME_WAIT reuse allows it.
"""

from __future__ import annotations

import errno
import threading
import time

import pytest

from tests.conftest import need
from tests.egress.conftest import T3, T4, A, B, config, get, peer_seen, target_row

T3S, T4S = f"{T3[0]}:{T3[1]}", f"{T4[0]}:{T4[1]}"


def test_blog_scenario_two_ips_two_ports(lab):
    """2 IPs x 2 ports: 2 tunnels to T3 per IP, the 5th is 0x01, T4 still works."""
    lab = lab()
    lab.target(T3)
    lab.target(T4)
    proxy = lab.socksd(config([f"{A}:1080", f"{B}:1080"]))
    held = []
    for ingress in (A, B):
        for _ in range(2):
            s, rep, bnd_addr, bnd_port = lab.tunnel((ingress, 1080), T3)
            assert rep == 0
            assert bnd_addr == ingress
            assert peer_seen(s) == (ingress, bnd_port), "target saw another source"
            assert 50000 <= bnd_port <= 50001
            held.append(s)
    for ingress in (A, B):
        started = time.monotonic()
        s, rep, _, _ = lab.tunnel((ingress, 1080), T3)
        assert rep == 0x01, "a 5th tunnel to T3 must be refused: no 4-tuple is free"
        assert time.monotonic() - started < 2.0
        assert s.recv(1) == b""
        s.close()
    s, rep, bnd_addr, bnd_port = lab.tunnel((A, 1080), T4)
    assert rep == 0 and bnd_addr == A
    assert peer_seen(s) == (A, bnd_port)
    held.append(s)

    stats = proxy.egress_stats()
    a = get(stats, A)
    assert a["succeeded"] == 3 and a["open"] == 3
    assert a["exhausted"] == 1
    assert a["retries"] == 3 and a["rescued"] == 0
    assert a["failed"] == {"eaddrnotavail": 4}  # first attempt + 3 retries
    assert get(stats, B)["exhausted"] == 1
    row = target_row(stats, A, T3S)
    assert row is not None
    assert row["open"] == 2 and row["exhausted"] == 1
    assert row["pressure"] == 1.0  # 2 open of P = 2
    assert stats["ephemeral_ports"] == 2
    logged = proxy.wait_for("egress_exhausted", lambda e: e["egress_ip"] == A)
    assert logged["target"] == T3S and logged["open"] == 2 and logged["attempts"] == 4
    closed = proxy.wait_for("tunnel_closed", lambda e: e["reply"] == 1 and e["ingress_ip"] == A)
    assert closed["reason"] == "egress_exhausted" and closed["target"] == T3S
    proxy.wait_for("egress_pressure_high", lambda e: e["egress_ip"] == A and e["target"] == T3S)
    for s in held:
        s.close()


def test_capacity_is_per_target_not_per_ip(lab):
    """P = 50 ports, K = 4 targets: one ingress IP carries exactly P x K = 200 tunnels."""
    p, k = 50, 4
    lab = lab(port_range=f"50000 {50000 + p - 1}")
    targets = [(f"127.0.0.{40 + i}", 9000) for i in range(k)]
    for t in targets:
        lab.target(t)
    proxy = lab.socksd(config([f"{A}:1080"], delays="[]"))
    held = []
    try:
        for t in targets:
            for _ in range(p):
                s, rep, _, _ = lab.tunnel((A, 1080), t)
                assert rep == 0, f"tunnel {len(held) + 1} refused"
                held.append(s)
        assert len(held) == p * k
        # A bind-before-connect proxy would have stopped at P: no port is left to bind.
        plain = lab.ns.socket()
        with pytest.raises(OSError) as err:
            plain.bind((A, 0))
        assert err.value.errno == errno.EADDRINUSE
        plain.close()
        for t in targets:
            s, rep, _, _ = lab.tunnel((A, 1080), t)
            assert rep == 0x01
            s.close()
        stats = proxy.egress_stats()
        assert get(stats, A)["open"] == p * k
        assert get(stats, A)["exhausted"] == k
        for t in targets:
            row = target_row(stats, A, f"{t[0]}:{t[1]}")
            assert row is not None and row["open"] == p and row["pressure"] == 1.0
    finally:
        for s in held:
            s.close()


def _open_and_close_two(lab, proxy):
    """Two tunnels to T3 that the client closes first: socksd sends the first FIN to
    the target, so socksd's egress sockets end in TIME_WAIT."""
    for _ in range(2):
        s, rep, _, _ = lab.tunnel((A, 1080), T3)
        assert rep == 0
        peer_seen(s)
        s.close()
    proxy.wait_count("tunnel_closed", 2, lambda e: e["reply"] == 0)


def test_time_wait_blocks_reuse_without_tw_reuse(lab):
    lab = lab(tw_reuse=0)
    lab.target(T3)
    proxy = lab.socksd(config([f"{A}:1080"]))
    _open_and_close_two(lab, proxy)
    started = time.monotonic()
    s, rep, _, _ = lab.tunnel((A, 1080), T3)
    assert rep == 0x01, "both quads are in TIME_WAIT for 60 s"
    assert time.monotonic() - started < 1.0, "must fail fast, not hang"
    s.close()
    stats = proxy.egress_stats()
    row = target_row(stats, A, T3S)
    assert row is not None
    assert row["open"] == 0 and row["recent_closes"] == 2 and row["exhausted"] == 1
    assert stats["reuse_window_s"] == 60.0


def test_time_wait_reused_after_delay_with_tw_reuse(lab):
    need(
        __import__("os").path.exists("/proc/sys/net/ipv4/tcp_tw_reuse_delay"),
        "kernel has no net.ipv4.tcp_tw_reuse_delay (Linux >= 6.13)",
    )
    lab = lab(tw_reuse=1, tw_reuse_delay_ms=400)
    lab.target(T3)
    # The last retry waits past tcp_tw_reuse_delay: it rescues the tunnel.
    proxy = lab.socksd(config([f"{A}:1080"], delays="[0.01, 0.01, 0.6]"))
    _open_and_close_two(lab, proxy)
    started = time.monotonic()
    s, rep, _, _ = lab.tunnel((A, 1080), T3)
    elapsed = time.monotonic() - started
    assert rep == 0, "a TIME_WAIT quad is reusable once tcp_tw_reuse_delay has passed"
    assert peer_seen(s)[0] == A
    s.close()
    stats = proxy.egress_stats()
    a = get(stats, A)
    assert a["rescued"] == 1 and a["exhausted"] == 0
    assert a["retries"] >= 1
    assert elapsed < 3
    time.sleep(0.5)  # past the delay: a fresh tunnel needs no retry at all
    s, rep, _, _ = lab.tunnel((A, 1080), T3)
    assert rep == 0
    s.close()


def test_churn_counters_add_up_to_what_clients_saw(lab):
    """Several clients open and close tunnels to one target as fast as they can."""
    lab = lab(port_range="50000 50003")
    lab.target(T3, close_first=True)
    proxy = lab.socksd(config([f"{A}:1080"]))
    per_client, clients, budget = 60, 12, 15.0
    seen = {"ok": 0, "refused": 0, "other": []}
    lock = threading.Lock()
    deadline = time.monotonic() + budget

    def churn() -> None:
        for _ in range(per_client):
            if time.monotonic() > deadline:
                return
            s, rep, _, _ = lab.tunnel((A, 1080), T3)
            if rep == 0:
                peer_seen(s)
            s.close()
            with lock:
                if rep == 0:
                    seen["ok"] += 1
                elif rep == 1:
                    seen["refused"] += 1
                else:
                    seen["other"].append(rep)

    threads = [threading.Thread(target=churn) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(budget + 10)
    total = seen["ok"] + seen["refused"]
    assert seen["other"] == []
    assert total >= 100, "the load loop did too little to prove anything"
    proxy.wait_count("tunnel_closed", total)
    stats = proxy.egress_stats()
    a = get(stats, A)
    assert a["succeeded"] == seen["ok"]
    assert a["exhausted"] == seen["refused"]
    assert a["open"] == 0
    assert a["retries"] > 0, "12 clients on 4 ports must reach the edge"
    assert a["rescued"] <= a["retries"]
    assert a["attempted"] == a["succeeded"] + sum(a["failed"].values())
    closed = proxy.named("tunnel_closed")
    assert sum(1 for e in closed if e["reply"] == 0) == seen["ok"]
    assert sum(1 for e in closed if e["reply"] == 1) == seen["refused"]
    bad = [e for e in proxy.events if e.get("level") == "error"]
    assert bad == []
    print(
        f"churn: {total} tunnels, {seen['ok']} ok, {seen['refused']} refused, "
        f"{a['retries']} retries, {a['rescued']} rescued"
    )


def test_wildcard_listener_egress_is_the_exact_ingress_ip(lab):
    lab = lab(port_range="50000 50099")
    lab.target(T3)
    proxy = lab.socksd(config(["0.0.0.0:1080"]))
    for ingress in (A, B, "127.0.0.9"):
        s, rep, bnd_addr, bnd_port = lab.tunnel((ingress, 1080), T3)
        assert rep == 0 and bnd_addr == ingress
        assert peer_seen(s) == (ingress, bnd_port)
        s.close()
    proxy.wait_for("tunnel_closed", lambda e: e["ingress_ip"] == "127.0.0.9")


def test_egress_map_and_unusable_mapping(lab):
    lab = lab(port_range="50000 50099")
    lab.target(T3)
    extra = (
        f'[[egress.map]]\ningress = "{A}"\nipv4 = "127.0.0.77"\n'
        f'[[egress.map]]\ningress = "{B}/32"\nipv4 = "192.0.2.1"\n'  # not on this host
    )
    proxy = lab.socksd(config([f"{A}:1080", f"{B}:1080"], extra=extra))
    s, rep, bnd_addr, bnd_port = lab.tunnel((A, 1080), T3)
    assert rep == 0 and bnd_addr == "127.0.0.77"
    assert peer_seen(s) == ("127.0.0.77", bnd_port)
    s.close()
    s, rep, _, _ = lab.tunnel((B, 1080), T3)
    assert rep == 0x01
    s.close()
    closed = proxy.wait_for("tunnel_closed", lambda e: e["ingress_ip"] == B)
    assert closed["reason"] == "egress_ip_not_local" and closed["stage"] == "bind"
    failed = proxy.wait_for("egress_bind_failed")
    assert failed["egress_ip"] == "192.0.2.1" and failed["errno"] == "eaddrnotavail"


def test_ipv6_ingress_and_family_mismatch(lab):
    lab = lab()
    v6 = "fd00:5::1"
    lab.ns.add_address(f"{v6}/128")
    lab.target(("::1", 9006))
    lab.target(("::1", 9007))
    lab.target(T3)
    lab.hosts(
        "127.0.0.1 localhost\n127.0.0.33 v4only.test\n::1 v6only.test\n"
        "127.0.0.33 dual.test\n::1 dual.test\n"
    )
    proxy = lab.socksd(config([f"[{v6}]:1080", f"{A}:1080"]))
    # IPv6 ingress, IPv6 target: leaves from the IPv6 ingress address, NO_PORT per target.
    held = []
    for _ in range(2):
        s, rep, bnd_addr, bnd_port = lab.tunnel((v6, 1080), ("::1", 9006))
        assert rep == 0 and bnd_addr == v6
        assert peer_seen(s) == (v6, bnd_port)
        held.append(s)
    s, rep, _, _ = lab.tunnel((v6, 1080), ("::1", 9006))
    assert rep == 0x01, "IPv6: P = 2 per (source, target) as well"
    s.close()
    for s in held:
        s.close()
    # A name with both families, asked through the IPv6 ingress: the IPv6 address is used.
    for name in ("v6only.test", "dual.test"):
        s, rep, bnd_addr, bnd_port = lab.tunnel((v6, 1080), (name, 9007))
        assert rep == 0 and bnd_addr == v6
        assert peer_seen(s) == (v6, bnd_port)
        s.close()
    # Family mismatch without a mapping: 0x04 and the reason, never another source IP.
    mismatches = [
        ((v6, 1080), T3),
        ((A, 1080), ("::1", 9007)),
        ((A, 1080), ("v6only.test", 9007)),
        ((v6, 1080), ("v4only.test", 9003)),
    ]
    for ingress, target in mismatches:
        s, rep, _, _ = lab.tunnel(ingress, target)
        assert rep == 0x04, (ingress, target)
        s.close()
    refused = proxy.wait_count("tunnel_closed", 4, lambda e: e["reply"] == 4)
    reasons = [e["reason"] for e in refused]
    assert reasons == ["no_egress_for_family"] * 4
    # dual.test through the IPv4 ingress: the IPv4 address, from the IPv4 ingress.
    s, rep, bnd_addr, bnd_port = lab.tunnel((A, 1080), ("dual.test", 9003))
    assert rep == 0 and bnd_addr == A
    assert peer_seen(s) == (A, bnd_port)
    s.close()


def test_kernel_settings_event_and_warnings(lab):
    lab = lab(port_range="1024 2000", tw_reuse=0)
    proxy = lab.socksd(config(["0.0.0.0:1080"]))
    settings = proxy.wait_for("kernel_settings")
    assert settings["ip_local_port_range"] == [1024, 2000]
    assert settings["tcp_tw_reuse"] == 0
    assert settings["ephemeral_ports"] == 977
    warn = proxy.wait_for("listen_port_in_ephemeral_range")
    assert warn["listen"] == "0.0.0.0:1080"
    proxy.wait_for("tcp_tw_reuse_not_enabled")
    lab.ns.sysctl("net.ipv4.ip_local_reserved_ports", "1080")
    quiet = lab.socksd(config(["127.0.0.1:1081", "127.0.0.2:1080"]))
    quiet.wait_for("kernel_settings")
    # 1081 is in the range and not reserved; 1080 is reserved; both loopback.
    # (The fd-limit warnings follow the test host's ulimit, not these sysctls.)
    warnings = [
        e["event"]
        for e in quiet.events
        if e.get("level") == "warning" and not e["event"].startswith("nofile_")
    ]
    assert warnings == ["listen_port_in_ephemeral_range"]


def test_aborted_tunnels_leave_no_time_wait(lab):
    """Idle-timed-out tunnels are cut with SO_LINGER {1, 0}: their quads are free at once
    (a graceful close would hold them in TIME_WAIT for 60 s with tcp_tw_reuse = 0)."""
    lab = lab(tw_reuse=0)
    lab.target(T3)
    proxy = lab.socksd(config([f"{A}:1080"]).replace("connect = 5.0", "connect = 5.0\nidle = 0.3"))
    held = []
    for _ in range(2):
        s, rep, _, _ = lab.tunnel((A, 1080), T3)
        assert rep == 0
        peer_seen(s)
        held.append(s)
    proxy.wait_count("tunnel_closed", 2, lambda e: e["reason"] == "idle_timeout")
    for s in held:
        s.close()
    s, rep, _, _ = lab.tunnel((A, 1080), T3)
    assert rep == 0, "an aborted egress socket must not hold its quad in TIME_WAIT"
    s.close()
    stats = proxy.egress_stats()
    assert get(stats, A)["exhausted"] == 0
    # Only the graceful close of the last tunnel may count as a TIME_WAIT close.
    row = target_row(stats, A, T3S)
    assert row is None or row["recent_closes"] <= 1


def test_name_with_several_addresses_tries_them_in_turn(lab):
    """A name whose first address refuses: socksd tries the next one and succeeds."""
    lab = lab(port_range="50000 50099")
    lab.target(T3)
    lab.hosts("127.0.0.1 localhost\n127.0.0.50 multi.test\n127.0.0.33 multi.test\n")
    proxy = lab.socksd(config([f"{A}:1080"]))
    s, rep, bnd_addr, bnd_port = lab.tunnel((A, 1080), ("multi.test", T3[1]))
    assert rep == 0 and bnd_addr == A
    assert peer_seen(s) == (A, bnd_port)
    s.close()
    closed = proxy.wait_for("tunnel_closed", lambda e: e["target"] == f"multi.test:{T3[1]}")
    assert closed["reply"] == 0
    # Every address refusing: the last error decides the reply.
    lab.hosts("127.0.0.1 localhost\n127.0.0.50 dead.test\n127.0.0.51 dead.test\n")
    s, rep, _, _ = lab.tunnel((A, 1080), ("dead.test", T3[1]))
    assert rep == 0x05
    s.close()
    failed = proxy.wait_for("tunnel_closed", lambda e: e["target"] == f"dead.test:{T3[1]}")
    assert failed["reason"] == "econnrefused"
    stats = proxy.egress_stats()
    assert get(stats, A)["failed"].get("econnrefused") == 3  # 127.0.0.50 twice, .51 once
