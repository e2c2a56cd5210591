"""Per-customer accounting (issue 16): real socksd processes on loopback, real clients.

Users log in with RFC 1929 and move known byte counts through short and long TCP
tunnels and UDP associations spread over 2 workers; then the supervisor's figures
(`socksd stats --users --json`, the real command), the log lines (`tunnel_usage` +
`tunnel_closed`), `socksd tunnels`, `socksd kick` and `/metrics` are held against
what the clients actually sent and received.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from socksd.control import query
from socksd.passwords import hash_password
from tests.integration.helpers import (
    REPO,
    TIMEOUT,
    Socksd,
    TargetServer,
    echo,
    encode_request,
    read_reply,
    recv_exact,
)
from tests.integration.test_protocols import UdpEcho, parse_udp_header, udp_client, udp_header

USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
_HASHES = {name: hash_password(pw) for name, pw in USERS.items()}


def _config(tmp: Path, extra: str = "", workers: int = 2) -> str:
    users = "".join(f'{name} = "{h}"\n' for name, h in _HASHES.items())
    return (
        f'listen = ["127.0.0.1:0"]\nworkers = {workers}\nshutdown_timeout = 1\n'
        "[stats]\ninterval = 0.2\n"
        f'[auth]\nmethod = "password"\n[auth.users]\n{users}'
        f"{extra}"
    )


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    procs: list[Socksd] = []

    def run(extra: str = "", workers: int = 2) -> Socksd:
        proc = Socksd(_config(tmp_path, extra, workers), tmp_path)
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        proc.stop()


def _cli(proc: Socksd, *args: str) -> subprocess.CompletedProcess[str]:
    """A real `socksd` command against the running server's control socket."""
    return subprocess.run(
        [sys.executable, "-m", "socksd", *args, "--socket", str(proc.control_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def _login(sock: socket.socket, user: str) -> None:
    sock.sendall(b"\x05\x01\x02")
    assert recv_exact(sock, 2) == b"\x05\x02"
    name, pw = user.encode(), USERS[user].encode()
    sock.sendall(b"\x01" + bytes([len(name)]) + name + bytes([len(pw)]) + pw)
    assert recv_exact(sock, 2) == b"\x01\x00"


def _tunnel(proxy: tuple[str, int], user: str, port: int) -> socket.socket:
    sock = socket.create_connection(proxy, timeout=TIMEOUT)
    _login(sock, user)
    sock.sendall(encode_request("127.0.0.1", port))
    assert read_reply(sock)[0] == 0
    return sock


def _source(sock: socket.socket, peer: Any) -> None:
    """Target: reads the 8-byte count of bytes wanted back, then everything the client
    sends until its FIN, then answers that many bytes and closes."""
    want = struct.unpack(">Q", recv_exact(sock, 8))[0]
    while sock.recv(65536):
        pass
    block = bytes(range(256)) * 256
    while want:
        n = min(want, len(block))
        sock.sendall(block[:n])
        want -= n


def _exchange(proxy: tuple[str, int], user: str, port: int, up: int, down: int) -> tuple[int, int]:
    """One short tunnel: `up` bytes to the target (8 of them say `down`), `down` back.
    Returns what the client sent and received."""
    sock = _tunnel(proxy, user, port)
    sock.sendall(struct.pack(">Q", down) + b"u" * (up - 8))
    sock.shutdown(socket.SHUT_WR)
    got = 0
    while chunk := sock.recv(65536):
        got += len(chunk)
    sock.close()
    return up, got


def _associate(
    proxy: tuple[str, int], user: str, client: socket.socket
) -> tuple[socket.socket, Any]:
    ctl = socket.create_connection(proxy, timeout=TIMEOUT)
    _login(ctl, user)
    ctl.sendall(encode_request(*client.getsockname()[:2], cmd=3))
    rep, host, port = read_reply(ctl)
    assert rep == 0
    return ctl, (host, port)


def _lines(proc: Socksd, event: str) -> list[dict[str, Any]]:
    return [e for e in proc.named(event) if e.get("user") in USERS]


def _users_json(proc: Socksd) -> dict[str, dict[str, Any]]:
    result = _cli(proc, "stats", "--users", "--json")
    assert result.returncode == 0, result.stderr
    return {row["user"]: row for row in json.loads(result.stdout)}


def _wait_settled(proc: Socksd, expect_open: int = 0) -> dict[str, dict[str, Any]]:
    """The per-user figures once two reports in a row agree and nothing is open."""
    deadline = time.monotonic() + 10
    last = None
    while time.monotonic() < deadline:
        rows = {r["user"]: r for r in query(str(proc.control_path), "users")["users"]}
        if rows == last and sum(r["open"] for r in rows.values()) == expect_open:
            return rows
        last = rows
        time.sleep(0.5)
    raise AssertionError(f"per-user figures did not settle: {last}")


def test_per_user_figures_equal_what_clients_moved_and_the_log_lines_add_up(start):
    proc = start("[accounting]\ninterval = 0.5\n")
    target = TargetServer(_source)
    udp_target = UdpEcho("127.0.0.1")
    want: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    try:
        # Short tunnels: different sizes per user, both ways, spread over both workers.
        for i in range(60):
            user = list(USERS)[i % 3]
            up, down = 100 + 37 * i + 1000 * (i % 3), 50 + 91 * i + 70_000 * (i % 2)
            sent, got = _exchange(proc.address, user, target.port, up, down)
            want[user]["bytes_up"] += sent
            want[user]["bytes_down"] += got
        # Long tunnels (echo, 1.6 s with traffic: past three accounting intervals).
        echo_target = TargetServer(echo)
        long_ones = []
        for user in USERS:
            sock = _tunnel(proc.address, user, echo_target.port)
            long_ones.append((user, sock))
        for _ in range(16):
            for n, (user, sock) in enumerate(long_ones):
                chunk = b"L" * (3000 + 500 * n)
                sock.sendall(chunk)
                recv_exact(sock, len(chunk))
                want[user]["bytes_up"] += len(chunk)
                want[user]["bytes_down"] += len(chunk)
            time.sleep(0.1)
        for _, sock in long_ones:
            sock.close()
        # UDP associations: known payloads, echoed as b"echo:" + payload.
        for n, user in enumerate(USERS):
            client = udp_client("127.0.0.1")
            ctl, relay = _associate(proc.address, user, client)
            for k in range(10 + n):
                payload = b"d" * (100 + 10 * k + n)
                client.sendto(udp_header(*udp_target.address) + payload, relay)
                _, _, body = parse_udp_header(client.recvfrom(65535)[0])
                want[user]["udp_bytes_up"] += len(payload)
                want[user]["udp_bytes_down"] += len(body)
                want[user]["udp_datagrams_up"] += 1
                want[user]["udp_datagrams_down"] += 1
            ctl.close()
            client.close()
        echo_target.close()
        proc.wait_count("tunnel_closed", 60 + 3 + 3, lambda e: e.get("user") in USERS)
        _wait_settled(proc)
        rows = _users_json(proc)  # the real `socksd stats --users --json`
    finally:
        target.close()
        udp_target.close()
    assert set(rows) == set(USERS)
    for user in USERS:
        for key, value in want[user].items():
            assert rows[user][key] == value, (user, key, rows[user][key], value)
        assert rows[user]["tunnels_opened"] == 20 + 1 and rows[user]["udp_opened"] == 1
        assert rows[user]["open"] == 0
    # Both workers served some of it.
    workers = {e["worker"] for e in _lines(proc, "tunnel_closed")}
    assert workers == {0, 1}
    # Billing from the log: tunnel_usage bytes + tunnel_closed unreported bytes.
    assert sum("unreported_up" in e for e in _lines(proc, "tunnel_closed")) == 3
    billed: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in _lines(proc, "tunnel_usage"):
        billed[e["user"]][0] += e["bytes_up"]
        billed[e["user"]][1] += e["bytes_down"]
    for e in _lines(proc, "tunnel_closed"):
        # Absent on a tunnel that had no tunnel_usage line: its totals are unreported.
        billed[e["user"]][0] += e.get("unreported_up", e["bytes_up"])
        billed[e["user"]][1] += e.get("unreported_down", e["bytes_down"])
    for user in USERS:
        assert billed[user] == [
            want[user]["bytes_up"] + want[user]["udp_bytes_up"],
            want[user]["bytes_down"] + want[user]["udp_bytes_down"],
        ]
    assert len(_lines(proc, "tunnel_usage")) >= 9  # 3 long tunnels x 3 intervals
    for user in USERS:
        print(f"{user}: {dict(want[user])} == stats --users; log sums {billed[user]}")
    text = _cli(proc, "stats", "--users")
    assert text.returncode == 0 and "alice" in text.stdout and "refused" in text.stdout


def test_a_long_tunnel_gets_one_record_per_interval_and_they_add_up(start):
    proc = start("[accounting]\ninterval = 0.5\n", workers=1)
    target = TargetServer(echo)
    try:
        sock = _tunnel(proc.address, "alice", target.port)
        sent = 0
        began = time.monotonic()
        while time.monotonic() - began < 1.75:  # past 3 intervals, short of a 4th
            chunk = b"x" * 4096
            sock.sendall(chunk)
            recv_exact(sock, len(chunk))
            sent += len(chunk)
            time.sleep(0.02)
        sock.close()
        closed = proc.wait_for("tunnel_closed", lambda e: e.get("user") == "alice")
    finally:
        target.close()
    records = _lines(proc, "tunnel_usage")
    assert [r["record"] for r in records] == [1, 2, 3]
    assert all(r["conn_id"] == closed["conn_id"] for r in records)
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in records)
    assert sum(r["bytes_up"] for r in records) + closed["unreported_up"] == sent
    assert sum(r["bytes_down"] for r in records) + closed["unreported_down"] == sent
    assert closed["bytes_up"] == closed["bytes_down"] == sent
    # Each record ~one interval after the previous (the sweep runs every 0.125 s).
    gaps = [b["duration_ms"] - a["duration_ms"] for a, b in zip(records, records[1:], strict=False)]
    assert all(350 <= g <= 650 for g in gaps), gaps
    print(
        f"records up {[r['bytes_up'] for r in records]} + unreported {closed['unreported_up']}"
        f" = {sent}; at {[r['duration_ms'] for r in records]} ms"
    )


def _alice_workers(proc: Socksd) -> set[str]:
    """The worker pids that hold alice's tunnels now (`conn` is "PID:ID")."""
    rows = json.loads(_cli(proc, "tunnels", "--user", "alice", "--json").stdout)
    return {r["conn"].split(":")[0] for r in rows}


def test_tunnels_lists_and_kick_closes_exactly_that_users_tunnels(start):
    proc = start()
    target = TargetServer(echo)
    try:
        # SO_REUSEPORT picks the worker from a hash of the client's port: 4 tunnels all
        # land on one worker 1 time in 8, so alice opens more until both workers hold some.
        socks = {
            user: [_tunnel(proc.address, user, target.port) for _ in range(4)]
            for user in ("alice", "bob")
        }
        while len(socks["alice"]) < 32 and len(_alice_workers(proc)) < 2:
            socks["alice"].append(_tunnel(proc.address, "alice", target.port))
        n_alice = len(socks["alice"])
        for group in socks.values():
            for sock in group:
                sock.sendall(b"ping")
                assert recv_exact(sock, 4) == b"ping"
        listed = _cli(proc, "tunnels", "--user", "alice", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        alice_ports = {s.getsockname()[1] for s in socks["alice"]}
        assert {int(r["client"].rsplit(":", 1)[1]) for r in rows} == alice_ports
        assert all(r["user"] == "alice" and r["bytes_up"] == 4 for r in rows)
        assert len({r["conn"].split(":")[0] for r in rows}) == 2, "on both workers"
        table = _cli(proc, "tunnels")
        assert table.returncode == 0 and table.stdout.count("127.0.0.1:") >= 8
        # Kick alice: exactly her tunnels end (reset), bob's keep working.
        kicked = _cli(proc, "kick", "--user", "alice")
        assert kicked.returncode == 0 and f"kicked {n_alice} tunnel(s)" in kicked.stdout
        for sock in socks["alice"]:
            sock.settimeout(TIMEOUT)
            with pytest.raises(OSError):
                sock.sendall(b"after")
                if not sock.recv(10):
                    raise ConnectionResetError("EOF")
        for sock in socks["bob"]:
            sock.sendall(b"still")
            assert recv_exact(sock, 5) == b"still"
        lines = proc.wait_count("tunnel_closed", n_alice, lambda e: e.get("reason") == "kicked")
        assert {e["user"] for e in lines} == {"alice"} and len(lines) == n_alice
        # One tunnel by its id.
        bob_rows = json.loads(_cli(proc, "tunnels", "--user", "bob", "--json").stdout)
        assert len(bob_rows) == 4
        one = _cli(proc, "kick", "--conn", bob_rows[0]["conn"])
        assert "kicked 1 tunnel(s)" in one.stdout
        left = json.loads(_cli(proc, "tunnels", "--json").stdout)
        assert sorted(r["conn"] for r in left) == sorted(r["conn"] for r in bob_rows[1:])
        bad = _cli(proc, "kick", "--conn", "nonsense")
        assert bad.returncode == 2 and "PID:CONN_ID" in bad.stderr
        for group in socks.values():
            for sock in group:
                sock.close()
    finally:
        target.close()


class _Counting:
    """Target that counts what it receives, with the time of each read."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []
        self.total = 0
        self.server = TargetServer(self._handle)

    def _handle(self, sock: socket.socket, peer: Any) -> None:
        while chunk := sock.recv(65536):
            self.total += len(chunk)
            self.marks.append((time.monotonic(), self.total))

    def received_by(self, when: float) -> int:
        return max((n for t, n in self.marks if t <= when), default=0)


def test_kill_9_of_a_worker_loses_at_most_one_report_interval(start):
    proc = start(workers=1)  # stats.interval = 0.2 s
    target = _Counting()
    try:
        sock = _tunnel(proc.address, "alice", target.server.port)
        stop = threading.Event()

        def pump() -> None:
            while not stop.is_set():  # ~2 MB/s
                try:
                    sock.sendall(b"k" * 20_000)
                except OSError:
                    return
                time.sleep(0.01)

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        time.sleep(1.5)
        worker = query(str(proc.control_path))["workers"][0]["pid"]
        killed_at = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        proc.wait_for("worker_exited", lambda e: e.get("worker_pid") == worker)
        stop.set()
        thread.join(5)
        time.sleep(0.3)
        relayed = target.received_by(killed_at + 0.05)  # what reached the target
        in_last_interval = relayed - target.received_by(killed_at - 0.2 - 0.1)
        billed = _users_json(proc)["alice"]["bytes_up"]
    finally:
        sock.close()
        target.server.close()
    assert 0 < billed <= relayed
    lost = relayed - billed
    assert lost <= in_last_interval, (lost, in_last_interval, relayed)
    print(
        f"kill -9: relayed {relayed} B, billed {billed} B, lost {lost} B "
        f"(bound: {in_last_interval} B moved in the last stats.interval + 0.1 s)"
    )


def _metrics(proc: Socksd) -> str:
    ready = proc.wait_for("supervisor_ready")
    return (
        urllib.request.urlopen(f"http://{ready['metrics']}/metrics", timeout=TIMEOUT)
        .read()
        .decode()
    )


def test_per_user_series_only_when_enabled_and_capped(start):
    target = TargetServer(_source)
    try:
        off = start('[metrics]\nlisten = "127.0.0.1:0"\n', workers=1)
        _exchange(off.address, "alice", target.port, 100, 100)
        _wait_settled(off)
        assert "socksd_user_" not in _metrics(off) and "socksd_ingress_" not in _metrics(off)
        on = start(
            '[metrics]\nlisten = "127.0.0.1:0"\nper_user = true\nper_ingress = true\n'
            "max_users = 2\n",
            workers=1,
        )
        for user, n in (("alice", 1000), ("bob", 2000), ("carol", 3000)):
            _exchange(on.address, user, target.port, n, n)
            _wait_settled(on)  # one after the other: the first two seen get series
        body = _metrics(on)
    finally:
        target.close()
    assert 'socksd_user_bytes_total{user="alice",direction="up"} 1000' in body
    assert 'socksd_user_bytes_total{user="bob",direction="down"} 2000' in body
    assert 'user="carol"' not in body
    assert "socksd_user_series_overflow_users 1" in body
    assert 'socksd_user_overflow_bytes_total{direction="up"} 3000' in body
    assert 'socksd_user_tunnels_open{user="alice"} 0' in body
    assert 'socksd_ingress_bytes_total{ingress_ip="127.0.0.1",direction="up"} 6000' in body
