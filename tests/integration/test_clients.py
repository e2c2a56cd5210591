"""Real clients (curl, PySocks) through a real socksd to real loopback targets."""

from __future__ import annotations

import socket
import subprocess

import socks  # PySocks

from socksd.passwords import hash_password
from tests.conftest import need
from tests.integration.conftest import HTTP_BODY, curl_path, ipv6_available
from tests.integration.helpers import TargetServer, echo, recv_exact


def _curl(proxy_flag: str, proxy: str, url: str) -> subprocess.CompletedProcess[bytes]:
    curl = curl_path()
    need(curl is not None, "curl is not installed")
    assert curl is not None
    return subprocess.run(
        [curl, "-sS", "--max-time", "10", proxy_flag, proxy, url],
        capture_output=True,
        timeout=20,
    )


def test_curl_socks5_local_resolution(proxy, http_target):
    host, port = proxy.address
    result = _curl("--socks5", f"{host}:{port}", f"http://127.0.0.1:{http_target}/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == HTTP_BODY
    closed = proxy.wait_for("tunnel_closed", lambda e: e["target"] == f"127.0.0.1:{http_target}")
    assert closed["reply"] == 0
    assert closed["bytes_down"] >= len(HTTP_BODY)
    assert closed["bytes_up"] > 0
    assert closed["ingress_ip"] == "127.0.0.1"
    assert closed["egress"].startswith("127.0.0.1:")
    assert closed["duration_ms"] >= 0


def test_curl_socks5_hostname_remote_resolution(proxy, http_target):
    host, port = proxy.address
    result = _curl("--socks5-hostname", f"{host}:{port}", f"http://localhost:{http_target}/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == HTTP_BODY
    proxy.wait_for("tunnel_closed", lambda e: e["target"] == f"localhost:{http_target}")


def test_curl_with_username_password(spawn, http_target):
    proc = spawn(
        'listen = ["127.0.0.1:0"]\nworkers = 1\n[auth]\nmethod = "password"\n'
        f'[auth.users]\nalice = "{hash_password("secret")}"\n'
    )
    host, port = proc.address
    for flag in ("--socks5", "--socks5-hostname"):
        ok = _curl(flag, f"alice:secret@{host}:{port}", f"http://127.0.0.1:{http_target}/")
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout == HTTP_BODY
    bad = _curl("--socks5", f"alice:wrong@{host}:{port}", f"http://127.0.0.1:{http_target}/")
    assert bad.returncode != 0
    noauth = _curl("--socks5", f"{host}:{port}", f"http://127.0.0.1:{http_target}/")
    assert noauth.returncode != 0
    failed = proc.wait_for("handshake_failed", lambda e: e["reason"] == "auth_failed")
    assert failed["user"] == "alice"
    proc.wait_for("handshake_failed", lambda e: e["reason"] == "no_acceptable_method")
    opened = proc.wait_for("tunnel_closed", lambda e: e.get("user") == "alice")
    assert opened["reply"] == 0
    proc.stop()
    assert not any("secret" in line or "wrong" in line for line in proc.raw), "password logged"


def _pysocks_roundtrip(
    proxy_addr: tuple[str, int], family: int, target: tuple[str, int], rdns: bool = True
) -> bytes:
    s = socks.socksocket(family, socket.SOCK_STREAM)
    s.set_proxy(socks.SOCKS5, proxy_addr[0], proxy_addr[1], rdns=rdns)
    s.settimeout(10)
    try:
        s.connect(target)
        s.sendall(b"ping" * 1000)
        return recv_exact(s, 4000)
    finally:
        s.close()


def test_pysocks_ipv4_and_domain_targets(proxy, echo_target):
    port = echo_target.port
    assert _pysocks_roundtrip(proxy.address, socket.AF_INET, ("127.0.0.1", port)) == b"ping" * 1000
    assert _pysocks_roundtrip(proxy.address, socket.AF_INET, ("localhost", port)) == b"ping" * 1000
    proxy.wait_for("tunnel_closed", lambda e: e["target"] == f"localhost:{port}")


def test_pysocks_ipv6_target(spawn):
    need(ipv6_available(), "IPv6 loopback (::1) is not available")
    target = TargetServer(echo, host="::1")
    try:
        proc = spawn('listen = ["[::1]:0"]\nworkers = 1\n')
        got = _pysocks_roundtrip(proc.address, socket.AF_INET6, ("::1", target.port), rdns=False)
        assert got == b"ping" * 1000
        closed = proc.wait_for("tunnel_closed")
        assert closed["target"] == f"[::1]:{target.port}"
        assert closed["egress"].startswith("[::1]:")
        assert target.peers[0][0] == "::1"
    finally:
        target.close()
