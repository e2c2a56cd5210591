"""The HTTP proxy front door on the SOCKS listener (issue 17): real socksd, real clients
(curl, requests, httpx, PySocks on the same port), real targets (HTTP, and HTTPS with a
throw-away CA from trustme), every status provoked."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import requests
import socks
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socksd.passwords import hash_password
from tests.integration.helpers import TIMEOUT, Socksd, recv_all, unanswered_port

_HASH = hash_password("pw")


class _Origin(BaseHTTPRequestHandler):
    """Answers every GET with what it saw: the path, the Host, the proxy headers and
    the peer address (the egress IP)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        seen = (
            f"path={self.path} host={self.headers.get('Host')} "
            f"proxy-auth={self.headers.get('Proxy-Authorization')} "
            f"proxy-connection={self.headers.get('Proxy-Connection')} "
            f"peer={self.client_address[0]}"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(seen)))
        self.end_headers()
        self.wfile.write(seen)

    def log_message(self, *args: Any) -> None:
        pass


class _Server:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def origins(ca: trustme.CA) -> Iterator[tuple[_Server, _Server]]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    plain, tls = _Server(), _Server(context)
    yield plain, tls
    plain.close()
    tls.close()


def _config(auth: bool = True, extra: str = "") -> str:
    text = 'listen = ["127.0.0.1:0", "127.0.0.2:0"]\nworkers = 1\nprotocols = ["socks5", "http"]\n'
    if auth:
        text += f'[auth]\nmethod = "password"\n[auth.users]\nalice = "{_HASH}"\n'
    return text + extra


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        pytest.fail("curl is required (the CI installs it)")
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=30)


def _raw(proxy: tuple[str, int], data: bytes) -> bytes:
    """Send `data` as a client would, then read the answer until the proxy closes."""
    with socket.create_connection(proxy, timeout=TIMEOUT) as sock:
        sock.sendall(data)
        return recv_all(sock)


def test_curl_absolute_form_and_connect_with_and_without_a_password(spawn, origins):
    plain, _ = origins
    proxy = spawn(_config())
    host, port = proxy.address
    url = f"http://127.0.0.1:{plain.port}/a/b?c=d"
    forwarded = _curl("-x", f"http://alice:pw@{host}:{port}", url)
    assert forwarded.returncode == 0, forwarded.stderr
    # Origin form, the Host kept, no Proxy-* header reaches the origin.
    assert forwarded.stdout.startswith("path=/a/b?c=d host=127.0.0.1:")
    assert "proxy-auth=None proxy-connection=None peer=127.0.0.1" in forwarded.stdout
    tunnelled = _curl("-p", "-x", f"http://alice:pw@{host}:{port}", url)
    assert tunnelled.returncode == 0 and tunnelled.stdout.startswith("path=/a/b?c=d")
    refused = _curl("-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://{host}:{port}", url)
    assert refused.stdout == "407"
    wrong = _curl("-p", "-x", f"http://alice:nope@{host}:{port}", url)
    assert wrong.returncode != 0 and "407" in wrong.stderr
    lines = proxy.named("tunnel_closed")
    assert [(e["protocol"], e.get("http_status")) for e in lines if e["reply"] == 0] == [
        ("http", None),
        ("http", 200),
    ]


def test_requests_and_httpx_to_http_and_https_targets(spawn, origins, ca, tmp_path):
    plain, tls = origins
    proxy = spawn(_config())
    proxy_url = f"http://alice:pw@{proxy.address[0]}:{proxy.address[1]}"
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    proxies = {"http": proxy_url, "https": proxy_url}
    r = requests.get(f"http://127.0.0.1:{plain.port}/plain", proxies=proxies, timeout=TIMEOUT)
    assert r.status_code == 200 and r.text.startswith("path=/plain")
    r = requests.get(
        f"https://localhost:{tls.port}/tls", proxies=proxies, verify=str(ca_file), timeout=TIMEOUT
    )
    assert r.status_code == 200 and r.text.startswith("path=/tls")
    context = ssl.create_default_context(cafile=str(ca_file))
    with httpx.Client(proxy=proxy_url, verify=context, timeout=TIMEOUT) as client:
        assert client.get(f"http://127.0.0.1:{plain.port}/x").text.startswith("path=/x")
        assert client.get(f"https://localhost:{tls.port}/y").text.startswith("path=/y")
    # The same port speaks SOCKS5 in the same test.
    sock = socks.socksocket()
    sock.set_proxy(socks.SOCKS5, *proxy.address, True, "alice", "pw")
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", plain.port))
    sock.sendall(b"GET /socks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"path=/socks" in recv_all(sock)
    sock.close()


def test_http_tunnels_leave_from_the_ingress_ip(spawn, origins):
    plain, _ = origins
    proxy = spawn(_config(auth=False))
    for ingress in proxy.listen:
        out = _curl(
            "-p", "-x", f"http://{ingress[0]}:{ingress[1]}", f"http://127.0.0.1:{plain.port}/"
        )
        assert out.returncode == 0 and out.stdout.endswith(f"peer={ingress[0]}"), out


def test_every_status(spawn, origins):
    plain, _ = origins
    with unanswered_port() as silent:
        proxy = spawn(_config(auth=False, extra="[timeouts]\nconnect = 1\nhandshake = 2\n"))
        host, port = proxy.address

        def status(request: bytes) -> bytes:
            return _raw((host, port), request).split(b"\r\n", 1)[0]

        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        free = closed.getsockname()[1]
        closed.close()
        assert status(b"CONNECT 10.255.255.1:80 HTTP/1.1\r\nHost: x\r\n\r\n") == (
            b"HTTP/1.1 403 Forbidden"
        )
        assert status(f"CONNECT 127.0.0.1:{free} HTTP/1.1\r\nHost: x\r\n\r\n".encode()) == (
            b"HTTP/1.1 502 Bad Gateway"
        )
        assert status(f"CONNECT 127.0.0.1:{silent} HTTP/1.1\r\nHost: x\r\n\r\n".encode()) == (
            b"HTTP/1.1 504 Gateway Timeout"
        )
        assert status(b"CONNECT nx.invalid:80 HTTP/1.1\r\nHost: x\r\n\r\n") == (
            b"HTTP/1.1 502 Bad Gateway"
        )
        # RFC 9112 section 3.2: an HTTP/1.1 request without Host is a 400.
        assert status(b"CONNECT 127.0.0.1:80 HTTP/1.1\r\n\r\n") == b"HTTP/1.1 400 Bad Request"
        assert status(b"GARBAGE\r\n\r\n") == b"HTTP/1.1 400 Bad Request"
        assert status(b"CONNECT nonsense HTTP/1.1\r\nHost: x\r\n\r\n") == (
            b"HTTP/1.1 400 Bad Request"
        )
        assert status(b"GET https://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n\r\n") == (
            b"HTTP/1.1 400 Bad Request"
        )
        huge = b"GET http://127.0.0.1/ HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
        assert status(huge) == b"HTTP/1.1 431 Request Header Fields Too Large"
        many = b"".join(b"X-%d: 1\r\n" % i for i in range(150))
        assert status(b"GET http://127.0.0.1/ HTTP/1.1\r\n" + many + b"\r\n") == (
            b"HTTP/1.1 431 Request Header Fields Too Large"
        )
        # Slowloris: one header byte every 0.2 s is cut at timeouts.handshake (2 s).
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
            sock.sendall(b"CONNECT 127.0.0.1:80 HTTP/1.1\r\n")
            started = time.monotonic()
            with pytest.raises(OSError):
                for _ in range(100):
                    sock.sendall(b"X")
                    time.sleep(0.2)
                    if sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                        raise ConnectionResetError("closed")
            assert 1.5 < time.monotonic() - started < 4.0
        proxy.wait_for("handshake_failed", lambda e: e.get("reason") == "handshake_timeout")
    reasons = {e["reason"] for e in proxy.named("tunnel_closed") if e.get("protocol") == "http"}
    assert {"destination_denied", "connect_timeout"} <= reasons
    statuses = {e.get("http_status") for e in proxy.named("tunnel_closed") if e["reply"]}
    assert {403, 502, 504} <= statuses


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.binary(min_size=1, max_size=600).map(lambda b: b"G" + b))
def test_random_bytes_get_an_answer_or_a_close_never_a_crash(proxy_http, data):
    with socket.create_connection(proxy_http.address, timeout=TIMEOUT) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            answer = recv_all(sock)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""
    assert answer == b"" or answer.startswith(b"HTTP/1.1 ")
    assert not proxy_http.named("session_crashed")


@pytest.fixture(scope="module")
def proxy_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    proc = Socksd(
        'listen = ["127.0.0.1:0"]\nworkers = 1\nprotocols = ["socks5", "http"]\n'
        "[timeouts]\nhandshake = 2\nconnect = 2\n",
        tmp_path_factory.mktemp("http"),
    )
    yield proc
    assert proc.stop() == 0
    assert not proc.named("session_crashed") and not proc.named("worker_died")


def test_chromium_loads_a_page_over_http_and_over_socks5_on_the_same_port(spawn, origins, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is required (.ci/run installs it)")
    plain, _ = origins
    proxy = spawn(_config(auth=False))
    host, port = proxy.address
    for scheme in ("http", "socks5"):
        out = subprocess.run(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",  # CI runs as root
                "--disable-gpu",
                f"--user-data-dir={tmp_path / scheme}",
                f"--proxy-server={scheme}://{host}:{port}",
                "--proxy-bypass-list=<-loopback>",  # proxy 127.0.0.1 too
                "--dump-dom",
                f"http://127.0.0.1:{plain.port}/page-{scheme}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert f"path=/page-{scheme}" in out.stdout, out.stderr[-2000:]
    protocols = {e["protocol"] for e in proxy.named("tunnel_closed") if e["reply"] == 0}
    assert protocols == {"http", "socks5"}


def test_a_forwarded_request_takes_nothing_after_its_head_to_the_origin(spawn, origins):
    plain, _ = origins
    proxy = spawn(_config())
    secret = "Basic YWxpY2U6cHc="  # alice:pw
    first = (
        f"GET http://127.0.0.1:{plain.port}/one HTTP/1.1\r\nHost: evil.example\r\n"
        f"Proxy-Authorization: {secret}\r\nProxy-Foo: x\r\n\r\n"
    )
    # The next request, pipelined: it must never reach this origin (its credentials!).
    second = f"GET /two HTTP/1.1\r\nHost: x\r\nProxy-Authorization: {secret}\r\n\r\n"
    answer = _raw(proxy.address, (first + second).encode()).decode()
    assert answer.count("HTTP/1.") == 1 and "path=/one" in answer
    # Host from the URL, no Proxy-* header at the origin.
    assert f"host=127.0.0.1:{plain.port} proxy-auth=None proxy-connection=None" in answer
    body = b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    auth = b"Proxy-Authorization: " + secret.encode() + b"\r\n"
    assert _raw(proxy.address, body.replace(b"\r\n\r\n", b"\r\n" + auth + b"\r\n", 1)).startswith(
        b"HTTP/1.1 411 "
    )


def test_hostile_heads_get_400_or_431_and_crash_nothing(spawn):
    proxy = spawn(_config(auth=False))
    for head, status in (
        (b"CONNECT \xff.example:443 HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        (b"CONNECT a\x01b:443 HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        (b"GET http://[::1/ HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        (b"CONNECT a:1 HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", b"400"),
        (
            b"GET http://a/ HTTP/1.1\nHost: a\n"
            + b"".join(b"X-%d: 1\n" % i for i in range(300))
            + b"\n",
            b"431",
        ),
    ):
        assert _raw(proxy.address, head).split(b" ", 2)[1] == status, head[:40]
    assert not proxy.named("session_crashed")
