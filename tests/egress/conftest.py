"""A socksd worker and target servers inside a throw-away network namespace.

Each test gets its own namespace, so it can set the sysctls that decide egress
capacity (a 2-port ephemeral range reproduces exhaustion in milliseconds) without
touching the host. All addresses are loopback addresses *inside* that namespace.
"""

from __future__ import annotations

import itertools
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import TIMEOUT, Socksd, encode_request, read_reply, recv_exact
from tests.netns import NetNS

A, B = "127.0.0.2", "127.0.0.3"  # ingress (= egress) IPs
T3, T4 = ("127.0.0.33", 9003), ("127.0.0.44", 9004)
RANGE_LO = 50000
CLIENT_PORTS_FROM = 20000  # clients bind ports outside the ephemeral range


class HoldTarget:
    """Accepts connections, tells each client the address it saw, holds it open.

    With `close_first`, it closes right after telling (the target closes first, so the
    TIME_WAIT lands on the target's side, as with most HTTP servers).
    """

    def __init__(self, ns: NetNS, addr: tuple[str, int], close_first: bool = False) -> None:
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.sock = ns.socket(family)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(addr)
        self.sock.listen(1024)
        self.sock.settimeout(0.2)
        self.addr = addr
        self.close_first = close_first
        self.peers: list[tuple[str, int]] = []
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.peers.append(peer[:2])
            try:
                conn.sendall(f"{peer[0]} {peer[1]}\n".encode())
            except OSError:
                conn.close()
                continue
            if self.close_first:
                conn.close()
                continue
            with self._lock:
                self.conns.append(conn)
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT * 3)
        try:
            while conn.recv(4096):
                pass
        except OSError:
            pass
        conn.close()  # after the proxy's FIN: the proxy closed first

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self.sock.close()
        with self._lock:
            for conn in self.conns:
                conn.close()


@dataclass
class Lab:
    """One namespace: sysctls set, socksd running, targets and clients inside it."""

    ns: NetNS
    tmp: Path
    targets: list[HoldTarget] = field(default_factory=list)
    proxies: list[Socksd] = field(default_factory=list)
    _ports: Iterator[int] = field(default_factory=lambda: itertools.count(CLIENT_PORTS_FROM))
    hosts_dir: Path | None = None

    def target(self, addr: tuple[str, int], close_first: bool = False) -> HoldTarget:
        t = HoldTarget(self.ns, addr, close_first)
        self.targets.append(t)
        return t

    def socksd(self, config: str) -> Socksd:
        proc = Socksd(config, self.tmp, prefix=("ip", "netns", "exec", self.ns.name))
        self.proxies.append(proc)
        return proc

    def hosts(self, text: str) -> None:
        """An /etc/hosts seen only inside this namespace (`ip netns exec` mounts it)."""
        self.hosts_dir = Path("/etc/netns") / self.ns.name
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        (self.hosts_dir / "hosts").write_text(text)

    def client(self, proxy: tuple[str, int]) -> socket.socket:
        """A client socket inside the namespace, bound outside the ephemeral range."""
        family = socket.AF_INET6 if ":" in proxy[0] else socket.AF_INET
        s = self.ns.socket(family)
        s.settimeout(TIMEOUT)
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", next(self._ports)))
        s.connect(proxy)
        return s

    def tunnel(
        self, proxy: tuple[str, int], target: tuple[str, int]
    ) -> tuple[socket.socket, int, str, int]:
        """Open a tunnel: (socket, REP, BND.ADDR, BND.PORT)."""
        s = self.client(proxy)
        s.sendall(b"\x05\x01\x00" + encode_request(target[0], target[1]))
        assert recv_exact(s, 2) == b"\x05\x00"
        rep, addr, port = read_reply(s)
        return s, rep, addr, port

    def close(self) -> None:
        for proc in self.proxies:
            proc.stop()
        for t in self.targets:
            t.close()
        if self.hosts_dir is not None:
            shutil.rmtree(self.hosts_dir, ignore_errors=True)


@pytest.fixture
def lab(netns: Callable[..., NetNS], tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    """Factory: `lab(port_range="50000 50001", tw_reuse=0, **sysctls)`."""
    made: list[Lab] = []

    def make(
        port_range: str = f"{RANGE_LO} {RANGE_LO + 1}",
        tw_reuse: int = 0,
        tw_reuse_delay_ms: int | None = None,
    ) -> Lab:
        ns = netns("eg")
        ns.sysctl("net.ipv4.ip_local_port_range", port_range)
        ns.sysctl("net.ipv4.tcp_tw_reuse", tw_reuse)
        if tw_reuse_delay_ms is not None:
            ns.sysctl("net.ipv4.tcp_tw_reuse_delay", tw_reuse_delay_ms)
        lab = Lab(ns, tmp_path)
        made.append(lab)
        return lab

    yield make
    for lab in made:
        lab.close()


def peer_seen(sock: socket.socket) -> tuple[str, int]:
    """The source address the target reported for this tunnel."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"EOF before the target's report: {line!r}")
        line += chunk
    host, port = line.decode().split()
    return host, int(port)


def config(listen: list[str], extra: str = "", delays: str = "[0.01, 0.01, 0.01]") -> str:
    quoted = ", ".join(f'"{a}"' for a in listen)
    return (
        f"listen = [{quoted}]\nworkers = 1\n[timeouts]\nconnect = 5.0\n"
        f"[egress.retry]\ndelays = {delays}\n{extra}\n"
        # Some labs listen on a wildcard or a ULA inside their namespace: name the
        # clients (the open-proxy guard refuses a non-loopback listener without rules).
        '[[access.clients]]\naction = "allow"\nfrom = ["127.0.0.0/8", "::1/128", "fd00::/8"]\n'
    )


def get(d: dict[str, Any], ip: str) -> dict[str, Any]:
    for item in d["ips"]:
        if item["ip"] == ip:
            return item
    return {
        "open": 0,
        "attempted": 0,
        "succeeded": 0,
        "failed": {},
        "exhausted": 0,
        "retries": 0,
        "rescued": 0,
    }


def target_row(d: dict[str, Any], ip: str, target: str) -> dict[str, Any] | None:
    for row in d["targets"]:
        if row["egress_ip"] == ip and row["target"] == target:
            return row
    return None
