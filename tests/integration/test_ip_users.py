"""Users known by their source address (issue 17): `access.users.NAME.clients` with
auth.method "ip", "ip_or_password" and "ip_and_password"; real socksd, real clients
(curl, PySocks, hand-written SOCKS5 from chosen source addresses)."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest
import socks

from socksd.control import query
from socksd.passwords import hash_password
from tests.integration.helpers import (
    TIMEOUT,
    TargetServer,
    echo,
    encode_request,
    read_reply,
    recv_exact,
)

_HASH = {"alice": hash_password("alice-pw"), "bob": hash_password("bob-pw")}


def _config(method: str, alice_clients: str = '["127.0.0.1/32"]', bob_clients: str = "") -> str:
    text = (
        'listen = ["127.0.0.1:0", "127.0.0.2:0"]\nworkers = 1\n'
        f'[auth]\nmethod = "{method}"\n[auth.users]\n'
        f'alice = "{_HASH["alice"]}"\nbob = "{_HASH["bob"]}"\n'
        f'[access.users.alice]\nclients = {alice_clients}\ningress = ["127.0.0.1"]\n'
    )
    if bob_clients:
        text += f"[access.users.bob]\nclients = {bob_clients}\n"
    return text


def _greet(
    proxy: tuple[str, int], source: str, methods: bytes, login: tuple[str, str] | None = None
) -> tuple[socket.socket, int, int | None]:
    """A SOCKS5 greeting from `source`: the socket, the method chosen and, after a
    login, its status."""
    sock = socket.socket()
    sock.settimeout(TIMEOUT)
    sock.bind((source, 0))
    sock.connect(proxy)
    sock.sendall(b"\x05" + bytes([len(methods)]) + methods)
    chosen = recv_exact(sock, 2)[1]
    status = None
    if login is not None and chosen == 2:
        name, pw = login[0].encode(), login[1].encode()
        sock.sendall(b"\x01" + bytes([len(name)]) + name + bytes([len(pw)]) + pw)
        status = recv_exact(sock, 2)[1]
    return sock, chosen, status


def _connect(sock: socket.socket, port: int) -> None:
    sock.sendall(encode_request("127.0.0.1", port))
    assert read_reply(sock)[0] == 0
    sock.sendall(b"hello")
    assert recv_exact(sock, 5) == b"hello"


@pytest.fixture
def target():
    server = TargetServer(echo)
    yield server
    server.close()


def test_ip_method_lets_the_whitelisted_client_in_without_a_password_on_its_ingress(spawn, target):
    proxy = spawn(_config("ip"))
    ingress, other_ingress = proxy.listen
    # PySocks with no credentials: method 0x00, and the tunnel is alice's.
    client = socks.socksocket()
    client.set_proxy(socks.SOCKS5, *ingress)
    client.settimeout(TIMEOUT)
    client.connect(("127.0.0.1", target.port))
    client.sendall(b"ping")
    assert recv_exact(client, 4) == b"ping"
    client.close()
    line = proxy.wait_for("tunnel_closed", lambda e: e.get("user") == "alice")
    assert line["login"] == "ip" and line["reply"] == 0
    # Another ingress IP than alice's: not her, and "ip" takes no password.
    sock, chosen, _ = _greet(other_ingress, "127.0.0.1", b"\x00\x02")
    assert chosen == 0xFF
    sock.close()
    # Another source address: nobody.
    sock, chosen, _ = _greet(ingress, "127.0.0.3", b"\x00")
    assert chosen == 0xFF
    sock.close()
    failed = proxy.wait_count("handshake_failed", 2)
    assert {e["reason"] for e in failed} == {"client_not_whitelisted"}


def test_curl_through_an_ip_user(spawn, target):
    if shutil.which("curl") is None:
        pytest.fail("curl is required (the CI installs it)")
    http = TargetServer(
        lambda s, p: (s.recv(65536), s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    )
    proxy = spawn(_config("ip_or_password"))
    ingress = proxy.listen[0]
    try:
        url = f"http://127.0.0.1:{http.port}/"
        whitelisted = subprocess.run(
            ["curl", "-sS", "--socks5", f"{ingress[0]}:{ingress[1]}", url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert whitelisted.returncode == 0 and whitelisted.stdout == "ok", whitelisted.stderr
        # From an address nobody is: a password is the way in (ip_or_password).
        elsewhere = subprocess.run(
            [
                "curl",
                "-sS",
                "--interface",
                "127.0.0.3",
                "--socks5",
                f"bob:bob-pw@{ingress[0]}:{ingress[1]}",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert elsewhere.returncode == 0 and elsewhere.stdout == "ok", elsewhere.stderr
        no_password = subprocess.run(
            [
                "curl",
                "-sS",
                "--interface",
                "127.0.0.3",
                "--socks5",
                f"{ingress[0]}:{ingress[1]}",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert no_password.returncode != 0
    finally:
        http.close()
    users = [e.get("user") for e in proxy.named("tunnel_closed") if e.get("reply") == 0]
    assert users == ["alice", "bob"]


def test_ip_and_password_needs_both(spawn, target):
    proxy = spawn(_config("ip_and_password"))
    ingress = proxy.listen[0]
    sock, chosen, status = _greet(ingress, "127.0.0.1", b"\x00\x02", ("alice", "alice-pw"))
    assert (chosen, status) == (2, 0), "her address and her password"
    _connect(sock, target.port)
    sock.close()
    sock, chosen, status = _greet(ingress, "127.0.0.1", b"\x00", None)
    assert chosen == 0xFF, "her address alone is not enough"
    sock.close()
    sock, chosen, status = _greet(ingress, "127.0.0.1", b"\x02", ("bob", "bob-pw"))
    assert (chosen, status) == (2, 1), "bob's password from alice's address"
    sock.close()
    sock, chosen, _ = _greet(ingress, "127.0.0.3", b"\x02", ("alice", "alice-pw"))
    assert chosen == 0xFF, "her password from elsewhere"
    sock.close()
    reasons = [e["reason"] for e in proxy.wait_count("handshake_failed", 3)]
    assert reasons == ["no_acceptable_method", "client_not_whitelisted", "client_not_whitelisted"]


def test_a_reload_that_drops_the_whitelist_revokes_the_ip_users_tunnels(spawn, target):
    proxy = spawn(_config("ip_or_password"))
    ingress = proxy.listen[0]
    by_ip, chosen, _ = _greet(ingress, "127.0.0.1", b"\x00")
    assert chosen == 0
    _connect(by_ip, target.port)
    by_password, chosen, status = _greet(ingress, "127.0.0.3", b"\x02", ("bob", "bob-pw"))
    assert (chosen, status) == (2, 0)
    _connect(by_password, target.port)
    text = proxy.config_path.read_text().replace('"127.0.0.1/32"', '"127.0.0.9/32"')
    proxy.config_path.write_text(text)
    outcome = query(str(proxy.control_path), "reload", timeout=60)
    assert outcome["ok"] and outcome["revoked"] == {"access.users.alice.clients": 1}
    line = proxy.wait_for("tunnel_closed", lambda e: e.get("reason") == "revoked")
    assert line["user"] == "alice"
    by_password.sendall(b"still")
    assert recv_exact(by_password, 5) == b"still"
    by_ip.close()
    by_password.close()


def test_credentials_sent_from_a_whitelisted_address_are_checked_and_win(spawn, target):
    proxy = spawn(_config("ip_or_password"))
    ingress = proxy.listen[0]
    # bob behind alice's NAT: his own account, not hers.
    sock, chosen, status = _greet(ingress, "127.0.0.1", b"\x00\x02", ("bob", "bob-pw"))
    assert (chosen, status) == (2, 0)
    _connect(sock, target.port)
    sock.close()
    sock, chosen, status = _greet(ingress, "127.0.0.1", b"\x00\x02", ("bob", "wrong"))
    assert (chosen, status) == (2, 1), "a wrong password is not saved by the address"
    sock.close()
    line = proxy.wait_for("tunnel_closed", lambda e: e.get("reply") == 0)
    assert line["user"] == "bob" and "login" not in line


def test_an_http_client_nobody_whitelisted_gets_403_under_ip(spawn, target):
    proxy = spawn('protocols = ["socks5", "http"]\n' + _config("ip"))
    host, port = proxy.listen[1]  # not alice's ingress IP
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 403 ")
    # HTTP: the refused request's one tunnel_closed line, with its status.
    failed = proxy.wait_for("tunnel_closed")
    assert failed["reason"] == "client_not_whitelisted" and failed["http_status"] == 403
    assert failed["protocol"] == "http" and failed["reply"] == 2
