"""Access rules and limits, through a real socksd on loopback with real clients."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from socksd.passwords import hash_password
from tests.integration.helpers import (
    REPO,
    TIMEOUT,
    Socksd,
    TargetServer,
    echo,
    encode_request,
    open_tunnel,
    read_reply,
    recv_exact,
)

BASE = 'listen = ["127.0.0.1:0"]\nworkers = 1\n'


@pytest.fixture
def target():
    server = TargetServer(echo)
    yield server
    server.close()


def _refused(proxy: Socksd, reason: str, want: int) -> bool:
    """Poll `socksd stats --json` until the refused counter for `reason` is `want`."""
    deadline = time.monotonic() + TIMEOUT
    got = None
    while time.monotonic() < deadline:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "socksd",
                "stats",
                "--json",
                "--socket",
                str(proxy.control_path),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
        )
        if out.returncode == 0:
            counters = json.loads(out.stdout)["total"]["counters"]
            got = counters.get("refused", {}).get(reason)
            if got == want:
                return True
        time.sleep(0.2)
    raise AssertionError(f"refused[{reason!r}] = {got}, wanted {want}")


def _start(tmp_path, text: str, **kw) -> Socksd:
    return Socksd(text, tmp_path, **kw)


def _request(proxy: tuple[str, int], atyp_host: str, port: int, src: str | None = None):
    """No-auth greeting + CONNECT; returns (REP, socket)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    if src:
        sock.bind((src, 0))
    sock.connect(proxy)
    sock.sendall(b"\x05\x01\x00")
    assert recv_exact(sock, 2) == b"\x05\x00"
    sock.sendall(encode_request(atyp_host, port))
    rep = read_reply(sock)[0]
    return rep, sock


# -- destinations (SSRF) ------------------------------------------------------------------

SSRF_TARGETS = [
    "127.0.0.1",  # ATYP IPv4
    "localhost",  # a name that resolves to loopback
    "2130706433",  # decimal form, resolved by getaddrinfo to 127.0.0.1
    "0x7f000001",  # hex form
    "0177.0.0.1",  # octal form
    "127.1",  # shorthand
    "0.0.0.0",  # connect(0.0.0.0) reaches this host
    "::",  # ATYP IPv6 unspecified
    "::1",
    "::ffff:127.0.0.1",  # IPv4-mapped IPv6 (ATYP IPv6)
    "64:ff9b::7f00:1",  # NAT64 form of 127.0.0.1
    "169.254.169.254",  # cloud metadata
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",
    "224.0.0.1",
    "fd00::1",
    "fe80::1",
]


def test_default_rules_deny_ssrf_targets_by_resolved_address(tmp_path, target):
    proxy = _start(tmp_path, BASE, allow_loopback_targets=False)
    try:
        for host in SSRF_TARGETS:
            rep, sock = _request(proxy.address, host, target.port)
            sock.close()
            assert rep == 0x02, host
        denied = proxy.wait_count("destination_denied", len(SSRF_TARGETS))
        rules = {e["rule"] for e in denied}
        assert rules <= {
            "default:loopback",
            "default:unspecified",
            "default:link_local",
            "default:private",
            "default:cgnat",
            "default:multicast",
            "default:ula",
        }, rules
        closed = proxy.wait_count("tunnel_closed", len(SSRF_TARGETS))
        assert {(e["reply"], e["reason"]) for e in closed} == {(2, "destination_denied")}
        assert not target.peers, "a denied request reached the target"
        # The refusals are counted for the stats (workers report every second).
        assert _refused(proxy, "destination_denied", len(SSRF_TARGETS))
    finally:
        proxy.stop()


def test_rules_open_holes_deliberately_first_match_wins(tmp_path, target):
    other = TargetServer(echo)
    try:
        text = BASE + (
            "[[access.destinations]]\n"
            f'action = "deny"\nto = ["127.0.0.1"]\nports = [{other.port}]\n'
            "[[access.destinations]]\n"
            f'action = "allow"\nto = ["127.0.0.0/8"]\nports = ["{target.port}-{target.port}"]\n'
        )
        proxy = _start(tmp_path, text, allow_loopback_targets=False)
        try:
            sock, (rep, _, _) = open_tunnel(proxy.address, "127.0.0.1", target.port)
            assert rep == 0
            sock.sendall(b"ping")
            assert recv_exact(sock, 4) == b"ping"
            sock.close()
            rep, sock = _request(proxy.address, "127.0.0.1", other.port)
            sock.close()
            assert rep == 0x02
            ev = proxy.wait_for("destination_denied")
            assert ev["rule"] == "access.destinations[0]"
            assert not other.peers
        finally:
            proxy.stop()
    finally:
        other.close()


def test_own_listener_is_never_a_destination(tmp_path):
    proxy = _start(tmp_path, BASE)  # loopback targets allowed
    try:
        host, port = proxy.address
        rep, sock = _request(proxy.address, host, port)
        sock.close()
        assert rep == 0x02
        assert proxy.wait_for("destination_denied")["rule"] == "own_listener"
    finally:
        proxy.stop()


# -- clients ------------------------------------------------------------------------------


def test_client_rules_checked_at_accept_before_any_byte(tmp_path, target):
    text = BASE + (
        '[[access.clients]]\naction = "deny"\nfrom = ["127.0.0.2/32"]\n'
        '[[access.clients]]\naction = "allow"\nfrom = ["127.0.0.0/8"]\n'
    )
    proxy = _start(tmp_path, text)
    try:
        denied = socket.create_connection(
            proxy.address, timeout=TIMEOUT, source_address=("127.0.0.2", 0)
        )
        try:
            # Closed without reading: no method selection ever comes back.
            denied.sendall(b"\x05\x01\x00")
            try:
                assert denied.recv(16) == b""
            except ConnectionResetError:
                pass
        finally:
            denied.close()
        ev = proxy.wait_for("client_denied")
        assert ev["client"] == "127.0.0.2" and ev["reason"] == "client_denied"
        sock, (rep, _, _) = open_tunnel(proxy.address, "127.0.0.1", target.port)
        assert rep == 0
        sock.close()
    finally:
        proxy.stop()


def _check_config(tmp_path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"c{time.monotonic_ns()}.toml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "socksd", "--check-config", "--config", str(path), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )


def test_open_proxy_guard_refuses_to_start(tmp_path):
    open_text = 'listen = ["0.0.0.0:1080"]\n'
    out = _check_config(tmp_path, open_text)
    assert out.returncode == 2
    assert "open proxy" in out.stderr and "allow_open_proxy" in out.stderr
    # A real start is refused the same way, before binding anything.
    path = tmp_path / "open.toml"
    path.write_text('listen = ["0.0.0.0:0"]\n')
    run = subprocess.run(
        [sys.executable, "-m", "socksd", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert run.returncode == 2 and "open proxy" in run.stderr
    # --listen overriding a loopback config is checked too.
    out = _check_config(tmp_path, 'listen = ["127.0.0.1:1080"]\n', "--listen", "[::]:1080")
    assert out.returncode == 2 and "open proxy" in out.stderr
    # Each deliberate way out is accepted.
    assert (
        _check_config(tmp_path, open_text + "[access]\nallow_open_proxy = true\n").returncode == 0
    )
    clients = open_text + '[[access.clients]]\naction = "allow"\nfrom = ["203.0.113.0/24"]\n'
    assert _check_config(tmp_path, clients).returncode == 0
    auth = open_text + (
        f'[auth]\nmethod = "password"\n[auth.users]\nalice = "{hash_password("x")}"\n'
    )
    assert _check_config(tmp_path, auth).returncode == 0


# -- per-user rules and limits --------------------------------------------------------------


def _users_config(extra: str = "") -> str:
    h = hash_password("secret")
    return (
        'listen = ["127.0.0.1:0", "127.0.0.2:0"]\nworkers = 1\n'
        f'[auth]\nmethod = "password"\n[auth.users]\nalice = "{h}"\nbob = "{h}"\n' + extra
    )


def test_user_limited_to_its_ingress_ips_and_destinations(tmp_path, target):
    other = TargetServer(echo)
    text = _users_config(
        '[access.users.alice]\ningress = ["127.0.0.2"]\n'
        "[access.users.bob]\n"
        f'destinations = [{{action = "deny", to = ["127.0.0.1"], ports = [{other.port}]}}]\n'
    )
    proxy = _start(tmp_path, text)
    try:
        one, two = proxy.listen
        creds = (b"alice", b"secret")
        sock, (rep, _, _) = open_tunnel(one, "127.0.0.1", target.port, auth=creds)
        sock.close()
        assert rep == 0x02, "alice may only come in on 127.0.0.2"
        sock, (rep, bnd, _) = open_tunnel(two, "127.0.0.1", target.port, auth=creds)
        assert rep == 0 and bnd == "127.0.0.2"
        sock.close()
        bob = (b"bob", b"secret")
        sock, (rep, _, _) = open_tunnel(one, "127.0.0.1", other.port, auth=bob)
        sock.close()
        assert rep == 0x02
        sock, (rep, _, _) = open_tunnel(one, "127.0.0.1", target.port, auth=bob)
        sock.close()
        assert rep == 0
        reasons = [e["reason"] for e in proxy.wait_count("tunnel_closed", 4)]
        assert "ingress_not_allowed" in reasons and "destination_denied" in reasons
        assert proxy.wait_for("destination_denied")["rule"] == "access.users.bob.destinations[0]"
        assert not other.peers
    finally:
        proxy.stop()
        other.close()


def test_per_client_ip_concurrency_limit(tmp_path, target):
    proxy = _start(tmp_path, BASE + "[limits]\nmax_tunnels_per_client_ip = 2\n")
    try:
        held = [open_tunnel(proxy.address, "127.0.0.1", target.port) for _ in range(2)]
        assert [rep for _, (rep, _, _) in held] == [0, 0]
        rep, sock = _request(proxy.address, "127.0.0.1", target.port)
        sock.close()
        assert rep == 0x02
        ev = proxy.wait_for("limit_reached")
        assert ev["reason"] == "client_ip_tunnel_limit" and ev["client_ip"] == "127.0.0.1"
        # Another client IP is not affected, and a closed tunnel frees its place.
        rep, other = _request(proxy.address, "127.0.0.1", target.port, src="127.0.0.5")
        assert rep == 0
        other.close()
        held[0][0].close()
        proxy.wait_count("tunnel_closed", 2, lambda e: e["reply"] == 0)
        sock, (rep, _, _) = open_tunnel(proxy.address, "127.0.0.1", target.port)
        assert rep == 0
        sock.close()
        held[1][0].close()
    finally:
        proxy.stop()


def test_per_user_concurrency_and_rate_limits(tmp_path, target):
    text = _users_config(
        "[limits]\nmax_tunnels_per_user = 2\n"
        "[access.users.bob]\nrate = 0.5\nburst = 2\nmax_tunnels = 10\n"
    )
    proxy = _start(tmp_path, text)
    try:
        one = proxy.listen[0]
        alice = (b"alice", b"secret")
        held = [open_tunnel(one, "127.0.0.1", target.port, auth=alice) for _ in range(2)]
        assert [rep for _, (rep, _, _) in held] == [0, 0]
        sock, (rep, _, _) = open_tunnel(one, "127.0.0.1", target.port, auth=alice)
        sock.close()
        assert rep == 0x02
        # bob: his own limit of 10 concurrent, but 2 new tunnels in a burst then 1 per 2 s.
        bob = (b"bob", b"secret")
        reps = []
        for _ in range(3):
            sock, (rep, _, _) = open_tunnel(one, "127.0.0.1", target.port, auth=bob)
            reps.append(rep)
            sock.close()
        assert reps == [0, 0, 0x02]
        reasons = {e["reason"] for e in proxy.wait_count("limit_reached", 2)}
        assert reasons == {"user_tunnel_limit", "user_rate_limit"}
        for s, _ in held:
            s.close()
    finally:
        proxy.stop()


def test_global_overload_closes_before_the_greeting(tmp_path, target):
    proxy = _start(tmp_path, BASE + "[limits]\nmax_tunnels = 2\n")
    try:
        held = [open_tunnel(proxy.address, "127.0.0.1", target.port) for _ in range(2)]
        extra = socket.create_connection(proxy.address, timeout=TIMEOUT)
        extra.sendall(b"\x05\x01\x00")
        try:
            assert extra.recv(16) == b""
        except ConnectionResetError:
            pass
        extra.close()
        assert proxy.wait_for("overloaded")["reason"] == "overloaded"
        for s, _ in held:
            s.close()
        proxy.wait_count("tunnel_closed", 2)
        sock, (rep, _, _) = open_tunnel(proxy.address, "127.0.0.1", target.port)
        assert rep == 0
        sock.close()
    finally:
        proxy.stop()


def test_repeated_auth_failures_from_one_ip_are_delayed(tmp_path, target):
    text = _users_config("[limits]\nauth_failures = 2\nauth_backoff = 0.6\n")
    proxy = _start(tmp_path, text)
    try:
        one = proxy.listen[0]
        wrong = (b"alice", b"wrong")
        for _ in range(2):
            _, (rep, _, status) = open_tunnel(one, "127.0.0.1", target.port, auth=wrong)
            assert rep == -1 and status == 1
        t0 = time.monotonic()
        _, (rep, _, status) = open_tunnel(one, "127.0.0.1", target.port, auth=wrong)
        held_for = time.monotonic() - t0
        assert rep == -1 and status == 1
        assert held_for >= 0.5, f"the third failure was answered after {held_for:.2f} s"
        # Another client IP is not held back.
        sock = socket.create_connection(one, timeout=TIMEOUT, source_address=("127.0.0.9", 0))
        sock.close()
        # Passwords never reach the log, even on failure.
        assert all("wrong" not in line and "secret" not in line for line in proxy.raw)
    finally:
        proxy.stop()
