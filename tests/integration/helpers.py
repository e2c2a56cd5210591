"""Real processes and servers for integration tests: socksd, targets, a raw client.

The raw SOCKS5 client here builds bytes by hand from RFC 1928/1929, independently of
socksd's codec, so a codec bug cannot hide behind its own mirror image.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.dnsserver import DNSServer

TIMEOUT = 10.0
LOOPBACK_TARGETS_RULE = """
[[access.destinations]]
action = "allow"
to = ["127.0.0.0/8", "::1/128"]
"""
REPO = Path(__file__).resolve().parents[2]
_DNS: DNSServer | None = None


def loopback_nameserver() -> str:
    """The loopback DNS server every socksd of the tests asks unless its config names
    another: it knows no name (NXDOMAIN), so no test's lookup leaves this machine and
    /etc/hosts (localhost) answers as usual. Started once per test process."""
    global _DNS  # noqa: PLW0603 - one server per test process, started on first use
    if _DNS is None:
        _DNS = DNSServer().start()
    return _DNS.nameserver


class Socksd:
    """A `python -m socksd` process; its JSON log lines are parsed as they arrive."""

    def __init__(
        self,
        config_text: str,
        tmp: Path,
        extra_args: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
        allow_loopback_targets: bool = True,
    ) -> None:
        stamp = time.monotonic_ns()
        self.config_path = tmp / f"socksd-{stamp}.toml"
        self.control_path = tmp / f"control-{stamp}.sock"
        if "[control]" not in config_text:
            config_text += f'\n[control]\nsocket = "{self.control_path}"\n'
        if "[resolver]" not in config_text:
            config_text += f'\n[resolver]\nnameservers = ["{loopback_nameserver()}"]\n'
        if allow_loopback_targets:
            # Tests reach their targets on loopback, which socksd denies by default: they
            # opt in explicitly, after any rule of their own (first match wins).
            config_text += LOOPBACK_TARGETS_RULE
        self.config_path.write_text(config_text)
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "socksd",
                "--config",
                str(self.config_path),
                *extra_args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env=env,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ready = self.wait_for("supervisor_ready")
        self.listen: list[tuple[str, int]] = [_split(a) for a in ready["listen"]]

    @property
    def address(self) -> tuple[str, int]:
        return self.listen[0]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            text = line.decode("utf-8", "replace")
            with self._cond:
                self.raw.append(text)
                try:
                    self.events.append(json.loads(text))
                except ValueError:
                    self.events.append({"event": "unparsable_line", "line": text})
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(
        self,
        event: str,
        where: Callable[[dict[str, Any]], bool] = lambda e: True,
        timeout: float = TIMEOUT,
    ) -> dict[str, Any]:
        """Wait for a log event named `event` matching `where`; return it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if e.get("event") == event and where(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    stderr = (
                        self.proc.stderr.read().decode()
                        if self.proc.poll() is not None and self.proc.stderr
                        else ""
                    )
                    raise AssertionError(
                        f"no {event!r} log event within {timeout}s; rc={self.proc.poll()} "
                        f"stderr={stderr!r} log={''.join(self.raw)[-3000:]}"
                    )
                self._cond.wait(min(left, 0.1))

    def wait_count(
        self,
        event: str,
        n: int,
        where: Callable[[dict[str, Any]], bool] = lambda e: True,
        timeout: float = TIMEOUT,
    ) -> list[dict[str, Any]]:
        """Wait until `n` events named `event` match `where`; return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.named(event) if where(e)]
            if len(found) >= n:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} of {n} {event!r} events within {timeout}s")
            time.sleep(0.01)

    def egress_stats(self) -> dict[str, Any]:
        """Ask the (single) worker for its egress snapshot (SIGUSR1) and return it."""
        before = len(self.named("egress_stats"))
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            stats = self.named("egress_stats")
            if len(stats) > before:
                return stats[-1]
            time.sleep(0.01)
        raise AssertionError("no egress_stats event after SIGUSR1")

    def named(self, event: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("event") == event]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        return self.proc.returncode


def _split(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


# -- targets -----------------------------------------------------------------------------


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    # socketserver's default backlog of 5 overflows under test load: the kernel then
    # drops the final ACK and resets "established" connections ~1 s later.
    request_queue_size = 1024


class TargetServer:
    """A threaded TCP server on loopback running `handler(sock, peer)` per connection."""

    def __init__(
        self, handler: Callable[[socket.socket, tuple[Any, ...]], None], host: str = "127.0.0.1"
    ) -> None:
        outer = self

        class _H(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(TIMEOUT * 3)
                outer.peers.append(self.client_address)
                try:
                    handler(self.request, self.client_address)
                except OSError:
                    pass  # the test asserts on what the client saw

        server_cls = _Server
        if ":" in host:
            server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        self.peers: list[tuple[Any, ...]] = []
        self.server = server_cls((host, 0), _H)
        self.host = host
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def echo(sock: socket.socket, peer: Any) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return out


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# -- a raw SOCKS5 client -------------------------------------------------------------------


def encode_request(host: str, port: int, cmd: int = 1) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode()
        addr = b"\x03" + bytes([len(name)]) + name
    else:
        addr = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    return b"\x05" + bytes([cmd]) + b"\x00" + addr + struct.pack("!H", port)


def read_reply(sock: socket.socket) -> tuple[int, str, int]:
    """Read a CONNECT reply; return (REP, BND.ADDR, BND.PORT)."""
    head = recv_exact(sock, 4)
    assert head[0] == 5 and head[2] == 0, head
    atyp = head[3]
    if atyp == 1:
        addr = str(ipaddress.IPv4Address(recv_exact(sock, 4)))
    elif atyp == 4:
        addr = str(ipaddress.IPv6Address(recv_exact(sock, 16)))
    else:
        raise AssertionError(f"unexpected ATYP {atyp}")
    (port,) = struct.unpack("!H", recv_exact(sock, 2))
    return head[1], addr, port


def open_tunnel(
    proxy: tuple[str, int],
    host: str,
    port: int,
    auth: tuple[bytes, bytes] | None = None,
    payload: bytes = b"",
) -> tuple[socket.socket, tuple[int, str, int]]:
    """Connect through the proxy; returns the socket and the reply (REP, BND)."""
    family = socket.AF_INET6 if ":" in proxy[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(proxy)
    if auth is None:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exact(sock, 2) == b"\x05\x00"
    else:
        user, password = auth
        sock.sendall(b"\x05\x01\x02")
        assert recv_exact(sock, 2) == b"\x05\x02"
        sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        status = recv_exact(sock, 2)
        if status != b"\x01\x00":
            return sock, (-1, "", status[1])
    sock.sendall(encode_request(host, port) + payload)
    return sock, read_reply(sock)


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose SYNs go unanswered: a listener with backlog 0 and its
    accept queue filled first, so a connect to it hangs until the connector gives up."""
    blackhole = socket.socket()
    fillers: list[socket.socket] = []
    try:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(blackhole.getsockname())
            fillers.append(f)
        time.sleep(0.2)
        yield blackhole.getsockname()[1]
    finally:
        for f in fillers:
            f.close()
        blackhole.close()
