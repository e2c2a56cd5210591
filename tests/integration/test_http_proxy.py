"""The HTTP proxy front door on the SOCKS listener (issue 17): real socksd, real clients
(curl, requests, httpx, PySocks on the same port), real targets (HTTP, and HTTPS with a
throw-away CA from trustme), every status provoked."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import h11
import httpx
import pytest
import requests
import socks
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socksd.http import response as http_response
from socksd.passwords import hash_password
from tests.integration.helpers import TIMEOUT, Socksd, recv_all, unanswered_port

_HASH = hash_password("pw")


class _Origin(BaseHTTPRequestHandler):
    """Answers every GET with what it saw: the path, the Host, the proxy headers and
    the peer address (the egress IP); a POST with its body's length and digest and how
    it was framed; a few paths misbehave on purpose."""

    protocol_version = "HTTP/1.1"

    def _answer(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Keep-Alive", "timeout=5")  # hop-by-hop: must not reach the client
        self.send_header("Connection", "keep-alive, X-Hop")
        self.send_header("X-Hop", "one hop only")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/close-delimited":  # an HTTP/1.0-style body: ends when we close
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
            self.wfile.write(b"until-close " * 1000)
            self.close_connection = True
            return
        if self.path == "/bad":
            self.wfile.write(b"HTTP/1.1 two hundred OK\r\n\r\n")
            self.close_connection = True
            return
        if self.path == "/cut":  # promises 100,000 bytes, sends 10, closes
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n0123456789")
            self.close_connection = True
            return
        if self.path == "/slow":
            time.sleep(3)
        if self.path.startswith("/status/"):
            self._answer(b"as asked", int(self.path.rsplit("/", 1)[1]))
            return
        if self.path.startswith("/bytes/"):
            self._answer(b"b" * int(self.path.rsplit("/", 1)[1]))
            return
        seen = (
            f"path={self.path} host={self.headers.get('Host')} "
            f"proxy-auth={self.headers.get('Proxy-Authorization')} "
            f"proxy-connection={self.headers.get('Proxy-Connection')} "
            f"peer={self.client_address[0]}"
        ).encode()
        self._answer(seen)

    do_HEAD = do_GET  # noqa: N815

    def do_POST(self) -> None:  # noqa: N802
        if self.path == "/early":  # answers before reading the body, and closes
            self.send_response(413)
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            return
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            framing = "chunked"
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            framing = "length"
        digest = hashlib.sha256(body).hexdigest()[:16]
        self._answer(f"len={len(body)} sha={digest} framing={framing} path={self.path}".encode())

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
    # One tunnel_closed line per request, with its status: the origin's for the
    # forwarded request, 200 for the tunnel, 407 for the two refused.
    lines = proxy.wait_count("tunnel_closed", 4)
    assert [(e["protocol"], e["http_status"], e["reply"] != 0) for e in lines] == [
        ("http", 200, False),
        ("http", 200, False),
        ("http", 407, True),
        ("http", 407, True),
    ]
    assert lines[0]["http_method"] == "GET" and "http_method" not in lines[1]
    assert not proxy.named("handshake_failed")


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
        # Slowloris: one header byte every 0.2 s is cut at timeouts.handshake (2 s)
        # with a 408 (RFC 9110 section 15.5.9).
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
            sock.sendall(b"CONNECT 127.0.0.1:80 HTTP/1.1\r\n")
            started = time.monotonic()
            answer = b""
            for _ in range(100):
                try:
                    sock.sendall(b"X")
                    answer = sock.recv(100, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    time.sleep(0.2)
                    continue
                break
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer
            assert 1.5 < time.monotonic() - started < 4.0
        proxy.wait_for("tunnel_closed", lambda e: e.get("reason") == "handshake_timeout")
    lines = [e for e in proxy.named("tunnel_closed") if e.get("protocol") == "http"]
    assert {"destination_denied", "connect_timeout", "handshake_timeout"} <= {
        e["reason"] for e in lines
    }
    # Every request has its line and status, the refused ones with a non-zero reply.
    assert {400, 403, 408, 431, 502, 504} <= {e["http_status"] for e in lines if e["reply"]}
    assert not proxy.named("handshake_failed")


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


def test_a_reload_without_http_closes_kept_alive_connections(spawn, origins):
    plain, _ = origins
    proxy = spawn(_config(auth=False))
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
        _get(sock, f"http://127.0.0.1:{plain.port}/")
        text = proxy.config_path.read_text()
        proxy.config_path.write_text(text.replace('"socks5", "http"', '"socks5"'))
        proxy.proc.send_signal(signal.SIGHUP)
        done = proxy.wait_for("reload_done")
        assert done["changed"] == ["protocols"]
        assert sock.recv(1) == b""  # between requests: it may not send another


def _http_lines(proxy: Socksd, n: int) -> list[dict[str, Any]]:
    return proxy.wait_count("tunnel_closed", n, lambda e: e.get("protocol") == "http")


def test_keep_alive_two_hosts_on_one_client_connection_each_with_its_own_upstream(spawn, origins):
    plain, _ = origins
    other = _Server()
    try:
        proxy = spawn(_config())
        host, port = proxy.address
        out = _curl(
            "-v",
            "-x",
            f"http://alice:pw@{host}:{port}",
            f"http://127.0.0.1:{plain.port}/one",
            f"http://localhost:{other.port}/two",
        )
    finally:
        other.close()
    assert out.returncode == 0, out.stderr
    assert "Re-using existing connection" in out.stderr  # curl kept its proxy connection
    assert f"path=/one host=127.0.0.1:{plain.port} proxy-auth=None" in out.stdout
    assert f"path=/two host=localhost:{other.port} proxy-auth=None" in out.stdout
    # The origin's hop-by-hop fields stop at the proxy.
    assert "< Keep-Alive" not in out.stderr and "< X-Hop" not in out.stderr
    first, second = _http_lines(proxy, 2)
    assert first["client"] == second["client"]  # one client connection ...
    assert first["egress"] != second["egress"]  # ... two upstreams
    assert (first["target"], second["target"]) == (
        f"127.0.0.1:{plain.port}",
        f"localhost:{other.port}",
    )
    assert "request" not in first and second["request"] == 2
    assert [(e["reason"], e["http_status"], e["reply"]) for e in (first, second)] == [
        ("done", 200, 0),
        ("done", 200, 0),
    ]


def test_requests_session_sends_bodies_both_framings_on_one_connection(spawn, origins):
    plain, _ = origins
    proxy = spawn(_config())
    base = f"http://127.0.0.1:{plain.port}"
    payload = os.urandom(300_000)
    digest = hashlib.sha256(payload).hexdigest()[:16]
    with requests.Session() as session:
        session.proxies = {"http": f"http://alice:pw@{proxy.address[0]}:{proxy.address[1]}"}
        assert session.get(base + "/first", timeout=TIMEOUT).text.startswith("path=/first")
        sized = session.post(base + "/sized", data=payload, timeout=TIMEOUT)
        chunked = session.post(
            base + "/chunked", data=iter([payload[:100_000], payload[100_000:]]), timeout=TIMEOUT
        )
        missing = session.get(base + "/status/404", timeout=TIMEOUT)
        head = session.head(base + "/bytes/5000", timeout=TIMEOUT)
    assert sized.text == f"len=300000 sha={digest} framing=length path=/sized"
    assert chunked.text == f"len=300000 sha={digest} framing=chunked path=/chunked"
    assert missing.status_code == 404 and missing.text == "as asked"
    assert head.status_code == 200 and head.headers["Content-Length"] == "5000"
    lines = _http_lines(proxy, 5)
    assert len({e["client"] for e in lines}) == 1, "one client connection"
    assert [e["http_status"] for e in lines] == [200, 200, 200, 404, 200]
    assert [e["http_method"] for e in lines] == ["GET", "POST", "POST", "GET", "HEAD"]
    assert all(e["bytes_up"] > 300_000 for e in lines[1:3])


def test_pipelined_requests_are_answered_in_order_each_to_its_origin(spawn, origins):
    plain, _ = origins
    other = _Server()
    proxy = spawn(_config())
    secret = "Basic YWxpY2U6cHc="  # alice:pw
    auth = f"Proxy-Authorization: {secret}\r\nProxy-Foo: x\r\n"
    try:
        requests_ = (
            f"GET http://127.0.0.1:{plain.port}/one HTTP/1.1\r\nHost: evil.example\r\n{auth}\r\n"
            f"POST http://127.0.0.1:{other.port}/two HTTP/1.1\r\nHost: x\r\n{auth}"
            "Content-Length: 5\r\n\r\nhello"
            f"GET http://127.0.0.1:{plain.port}/three HTTP/1.1\r\nHost: x\r\n{auth}\r\n"
            # Origin form is not a proxy request: answered by the proxy, never forwarded
            # (its Proxy-Authorization must not reach an origin).
            f"GET /four HTTP/1.1\r\nHost: x\r\n{auth}\r\n"
        )
        answer = _raw(proxy.address, requests_.encode()).decode()
    finally:
        other.close()
    statuses = re.findall(r"HTTP/1\.1 (\d{3}) ", answer)
    assert statuses == ["200", "200", "200", "400"], answer
    one, two, three = (
        answer.index("path=/one"),
        answer.index("path=/two"),
        answer.index("path=/three"),
    )
    assert one < two < three
    assert f"host=127.0.0.1:{plain.port} proxy-auth=None proxy-connection=None" in answer
    assert "len=5 sha=" in answer and "/four" not in answer
    lines = _http_lines(proxy, 4)
    assert [e.get("request", 1) for e in lines] == [1, 2, 3, 4]
    assert [e["http_status"] for e in lines] == [200, 200, 200, 400]
    # The books: what the lines say went down is what the client read.
    assert sum(e["bytes_down"] for e in lines[:3]) + len(http_response(400)) == len(answer)


def _get(sock: socket.socket, url: str, version: bytes = b"1.1") -> tuple[h11.Response, bytes]:
    """One request on a raw client connection, read with h11 (framing checked)."""
    client = h11.Connection(h11.CLIENT)
    request = f"GET {url} HTTP/{version.decode()}\r\nHost: x\r\n\r\n".encode()
    sock.sendall(request)
    client.send(h11.Request(method="GET", target=url, headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    head, body = None, b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return head, body
        else:
            raise AssertionError(event)


def test_a_close_delimited_response_is_chunked_for_http11_and_closes_http10(spawn, origins):
    plain, _ = origins
    proxy = spawn(_config(auth=False))
    url = f"http://127.0.0.1:{plain.port}"
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
        head, body = _get(sock, url + "/close-delimited")
        assert body == b"until-close " * 1000
        assert (b"transfer-encoding", b"chunked") in head.headers
        # ... so the connection stays for the next request.
        head, body = _get(sock, url + "/again")
        assert head.status_code == 200 and body.startswith(b"path=/again")
        # A CONNECT later on the same connection becomes a tunnel (as browsers may do).
        sock.sendall(f"CONNECT 127.0.0.1:{plain.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(100) == b"HTTP/1.1 200 Connection established\r\n\r\n"
        head, body = _get(sock, "/tunnelled")
        assert head.status_code == 200 and body.startswith(b"path=/tunnelled")
    # HTTP/1.0 has no chunked coding: the body ends when the proxy closes.
    answer = _raw(proxy.address, f"GET {url}/close-delimited HTTP/1.0\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"until-close " * 1000)
    assert b"transfer-encoding" not in answer.lower()


def test_expect_100_continue_a_bad_and_a_cut_response(spawn, origins, tmp_path):
    plain, _ = origins
    proxy = spawn(_config())
    host, port = proxy.address
    upload = tmp_path / "upload"
    upload.write_bytes(os.urandom(2_000_000))
    digest = hashlib.sha256(upload.read_bytes()).hexdigest()[:16]
    base = f"http://127.0.0.1:{plain.port}"
    proxied = ("-x", f"http://alice:pw@{host}:{port}")
    sent = _curl(
        "-v", *proxied, "-H", "Expect: 100-continue", "--data-binary", f"@{upload}", base + "/up"
    )
    assert sent.returncode == 0, sent.stderr
    assert "< HTTP/1.1 100" in sent.stderr  # the origin's 100 Continue, passed on
    assert sent.stdout == f"len=2000000 sha={digest} framing=length path=/up"
    bad = _curl("-o", "/dev/null", "-w", "%{http_code}", *proxied, base + "/bad")
    assert bad.stdout == "502"
    cut = _curl(*proxied, base + "/cut")
    assert cut.returncode in (18, 56), cut  # partial file / connection reset: never "complete"
    # An origin that answers before the body is in: the client gets that answer (the
    # rest of its body is not sent on) and the connection closes.
    early = _curl("-w", "%{http_code}", *proxied, "--data-binary", f"@{upload}", base + "/early")
    assert early.stdout == "413", early
    # A client that leaves while the origin thinks: noticed at once, not at the answer.
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
        auth = "Proxy-Authorization: Basic YWxpY2U6cHc=\r\n"
        sock.sendall(f"GET {base}/slow HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        time.sleep(0.3)
    left = proxy.wait_for("tunnel_closed", lambda e: e.get("reason") == "client_closed", 2.0)
    assert left["http_status"] == 0 and left["duration_ms"] < 1500
    lines = _http_lines(proxy, 5)
    assert [(e["reason"], e["http_status"]) for e in lines] == [
        ("done", 200),
        ("upstream_bad_response", 502),
        ("upstream_cut_response", 200),
        ("done", 413),
        ("client_closed", 0),
    ]


def test_kept_alive_connections_close_when_idle_and_when_the_worker_stops(spawn, origins):
    plain, _ = origins
    proxy = spawn(
        _config(auth=False, extra="shutdown_timeout = 20\n[timeouts]\nhttp_keepalive = 1\n")
    )
    url = f"http://127.0.0.1:{plain.port}/"
    # A client that closes between requests is closed at once; the next request's
    # duration starts at its first byte, not at the end of the previous one.
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
        _get(sock, url)
        time.sleep(0.6)
        _get(sock, url + "second")
        started = time.monotonic()
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
        assert time.monotonic() - started < 0.5
    second = proxy.wait_for("tunnel_closed", lambda e: e.get("request") == 2)
    assert second["duration_ms"] < 500
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
        _get(sock, url)
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the proxy: idle past http_keepalive
        assert 0.8 < time.monotonic() - started < 2.0  # swept every 0.25 s
    # A stopping worker closes kept-alive connections between requests at once (it
    # does not wait shutdown_timeout for them).
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
        _get(sock, url)
        started = time.monotonic()
        assert proxy.stop() == 0
        assert sock.recv(1) == b""
        assert time.monotonic() - started < 5.0


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
