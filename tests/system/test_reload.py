"""Reload in place (issue 15): real `socksd` processes, real tunnels, `socksd reload`.

Users come from `auth.users_file`, which each test rewrites as a provisioning system
would (write a new file, rename it over the old one), then reloads with the real
`socksd reload` command (or its control-socket request) and judges what clients see:
which tunnels are cut (reset at once, `tunnel_closed reason="revoked"` with the rule
or change that revoked them), which keep every byte, and that no worker is replaced.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
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
    loopback_nameserver,
    open_tunnel,
    recv_exact,
)

_HASHES: dict[str, str] = {}


def _hash(password: str) -> str:
    if password not in _HASHES:  # scrypt costs ~40 ms: once per password per run
        _HASHES[password] = hash_password(password)
    return _HASHES[password]


def users_toml(users: dict[str, dict[str, Any]]) -> str:
    """A users file: name -> {"password": clear text, other keys as TOML values}."""
    out = []
    for name, spec in users.items():
        out.append(f"[users.{name}]")
        out.append(f'password = "{_hash(spec["password"])}"')
        for key, value in spec.items():
            if key == "password":
                continue
            if isinstance(value, list):
                out.append(f"{key} = [{', '.join(repr(v) for v in value)}]".replace("'", '"'))
            else:
                out.append(f"{key} = {value}")
        out.append("")
    return "\n".join(out)


def write_atomically(path: Path, text: str) -> None:
    """As a provisioning system does: a new file renamed over the old one."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def config_text(tmp: Path, *, workers: int = 2, listen: str, extra: str = "") -> str:
    """The whole config (control socket, DNS, target rules written here, not by the
    helper, so that a test's deny rule can come before the loopback allow rule)."""
    return (
        f"listen = {listen}\nworkers = {workers}\nshutdown_timeout = 1\n"
        "[stats]\ninterval = 0.1\n"
        '[auth]\nmethod = "password"\nusers_file = "users.toml"\n'
        f'[control]\nsocket = "{tmp}/control.sock"\n'
        f'[resolver]\nnameservers = ["{loopback_nameserver()}"]\n'
        f"{extra}"
        '[[access.destinations]]\naction = "allow"\nto = ["127.0.0.0/8"]\n'
    )


class Proxy:
    """A socksd with a users file in `tmp`, reloaded in place by the test."""

    def __init__(self, tmp: Path, users: dict[str, dict[str, Any]], **config: Any) -> None:
        self.tmp = tmp
        self.control_path = str(tmp / "control.sock")  # as config_text() names it
        self.users_path = tmp / "users.toml"
        write_atomically(self.users_path, users_toml(users))
        self.config: dict[str, Any] = {"listen": '["127.0.0.1:0"]', **config}
        self.proc = Socksd(self._text(), tmp, allow_loopback_targets=False)
        # The helper wrote the config under its own name; keep rewriting that file.
        self.proc.config_path.write_text(self._text())

    def _text(self) -> str:
        return config_text(self.tmp, **self.config)

    def set(self, users: dict[str, dict[str, Any]] | None = None, **config: Any) -> None:
        if users is not None:
            write_atomically(self.users_path, users_toml(users))
        if config:
            self.config.update(config)
            write_atomically(self.proc.config_path, self._text())

    def reload_cli(self) -> subprocess.CompletedProcess[str]:
        """The real `socksd reload` command."""
        return subprocess.run(
            [sys.executable, "-m", "socksd", "reload", "--socket", self.control_path],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )

    def reload(self) -> dict[str, Any]:
        """`socksd reload`'s request on the control socket, without a process start."""
        return query(self.control_path, "reload", timeout=60)

    def worker_pids(self) -> set[int]:
        stats = query(self.control_path)
        return {w["pid"] for w in stats["workers"] if w["alive"]}

    def stop(self) -> None:
        if self.proc.proc.poll() is None:
            self.proc.proc.send_signal(signal.SIGTERM)
        self.proc.stop()


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def start(users: dict[str, dict[str, Any]], **config: Any) -> Proxy:
        proxy = Proxy(tmp_path, users, **config)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def target() -> Iterator[TargetServer]:
    server = TargetServer(echo)
    yield server
    server.close()


@pytest.fixture
def target_b() -> Iterator[TargetServer]:
    server = TargetServer(echo)
    yield server
    server.close()


class Flow:
    """One tunnel with bytes flowing both ways: a writer thread sends random chunks, a
    reader thread reads the echo; SHA-256 of both sides, and when the flow ended."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.sent = hashlib.sha256()
        self.got = hashlib.sha256()
        self.nsent = self.ngot = 0
        self.ended_at: float | None = None  # when the reader saw EOF or a reset
        self.error: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        sock.settimeout(None)
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer.start()
        self._reader.start()

    def _write(self) -> None:
        rng = hashlib.sha256(self.name.encode())
        while not self._stop.is_set():
            rng = hashlib.sha256(rng.digest())
            chunk = rng.digest() * 64  # 2 KiB
            try:
                self.sock.sendall(chunk)
            except OSError:
                return
            with self._lock:
                self.sent.update(chunk)
                self.nsent += len(chunk)
            time.sleep(0.01)

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError as exc:
                self.error = type(exc).__name__
                data = b""
            if not data:
                self.ended_at = time.monotonic()
                return
            self.got.update(data)
            self.ngot += len(data)

    def finish(self) -> bool:
        """Stop writing, half-close, read the rest; True if every byte came back."""
        self._stop.set()
        self._writer.join(TIMEOUT)
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._reader.join(TIMEOUT)
        self.sock.close()
        return (
            self.error is None
            and self.nsent == self.ngot
            and (self.sent.hexdigest() == self.got.hexdigest())
        )

    def alive(self) -> bool:
        return self.ended_at is None


def flow(proxy: tuple[str, int], port: int, user: str, password: str) -> Flow:
    sock, (rep, _, _) = open_tunnel(
        proxy, "127.0.0.1", port, auth=(user.encode(), password.encode())
    )
    assert rep == 0, (user, rep)
    return Flow(sock, user)


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


# -- revocation -----------------------------------------------------------------------


def test_reload_revokes_exactly_the_tunnels_the_new_config_refuses(proxies, target, target_b):
    users = {
        "alice": {"password": "a-pass"},  # removed
        "bob": {"password": "b-pass"},  # password changed
        "carol": {"password": "c-pass", "ingress": ["127.0.0.1", "127.0.0.2"]},  # loses .2
        "dave": {"password": "d-pass"},  # goes to target B, which a new rule denies
        "erin": {"password": "e-pass"},  # nothing changes for her
    }
    p = proxies(users, listen='["127.0.0.1:0", "127.0.0.2:0"]')
    one, two = p.proc.listen
    pids = p.worker_pids()
    flows = {
        "alice": flow(one, target.port, "alice", "a-pass"),
        "bob": flow(one, target.port, "bob", "b-pass"),
        "carol@2": flow(two, target.port, "carol", "c-pass"),
        "carol@1": flow(one, target.port, "carol", "c-pass"),
        "dave": flow(one, target_b.port, "dave", "d-pass"),
        "erin": flow(one, target.port, "erin", "e-pass"),
        "erin@2": flow(two, target.port, "erin", "e-pass"),
    }
    time.sleep(0.5)
    assert all(f.alive() for f in flows.values())

    del users["alice"]
    users["bob"] = {"password": "b-new"}
    users["carol"] = {"password": "c-pass", "ingress": ["127.0.0.1"]}
    deny_b = (
        f'[[access.destinations]]\naction = "deny"\nto = ["127.0.0.1"]\nports = [{target_b.port}]\n'
    )
    p.set(users, extra=deny_b)
    result = p.reload_cli()
    returned = time.monotonic()
    assert result.returncode == 0, result.stderr
    assert "4 connection(s) revoked" in result.stdout

    revoked = {"alice", "bob", "carol@2", "dave"}
    deadline = returned + 1.0
    while time.monotonic() < deadline and any(flows[n].alive() for n in revoked):
        time.sleep(0.01)
    for name in revoked:
        f = flows[name]
        assert f.ended_at is not None, f"{name}: still open 1 s after the reload returned"
        # Within 1 s of the reload's return (it returns once every worker applied it,
        # so the cut happened before; the margin is the client thread's wake-up).
        assert f.ended_at - returned < 1.0
    cut = {n: round((flows[n].ended_at - returned) * 1000, 1) for n in revoked}  # type: ignore[operator]
    print(f"revoked tunnels seen closed, ms after `socksd reload` returned: {cut}")
    time.sleep(0.5)  # the others keep flowing through and after the reload
    for name in set(flows) - revoked:
        assert flows[name].alive(), f"{name} was cut"
        assert flows[name].finish(), f"{name} lost bytes"
    for name in revoked:
        flows[name].finish()

    lines = [e for e in p.proc.events if e.get("event") == "tunnel_closed"]
    by_user = {}
    for e in lines:
        if e.get("reason") == "revoked":
            key = e["user"] + ("@2" if e["ingress_ip"] == "127.0.0.2" else "")
            by_user[key] = e["revoked_by"]
    assert by_user == {
        "alice": "user_removed",
        "bob": "password_changed",
        "carol@2": "access.users.carol.ingress",
        "dave": "access.destinations[0]",
    }
    done = p.proc.wait_for("reload_done")
    print(f"reload_done: {done['duration_ms']} ms from the request to the last worker's answer")
    assert done["revoked_total"] == 4 and done["workers_replaced"] == 0
    assert set(done["changed"]) == {"auth", "access"}
    assert p.worker_pids() == pids
    # The changed and removed users' cached logins are gone: old passwords fail now.
    for user, password in (("alice", "a-pass"), ("bob", "b-pass")):
        s, (rep, _, _) = open_tunnel(
            one, "127.0.0.1", target.port, auth=(user.encode(), password.encode())
        )
        s.close()
        assert rep == -1, f"{user} logged in with a revoked password"
    s, (rep, _, _) = open_tunnel(one, "127.0.0.1", target.port, auth=(b"bob", b"b-new"))
    s.close()
    assert rep == 0


def test_added_user_works_as_soon_as_reload_returns(proxies, target):
    users = {"alice": {"password": "a-pass"}}
    p = proxies(users)
    pids = p.worker_pids()
    users["frank"] = {"password": "f-pass"}
    p.set(users)
    result = p.reload_cli()
    assert result.returncode == 0, result.stderr
    assert "changed auth" in result.stdout
    # Both workers (SO_REUSEPORT picks one per connection): every login must work.
    for _ in range(10):
        s, (rep, _, _) = open_tunnel(
            p.proc.address, "127.0.0.1", target.port, auth=(b"frank", b"f-pass")
        )
        s.close()
        assert rep == 0
    assert p.worker_pids() == pids
    assert p.proc.named("worker_spawned")[2:] == []


def test_broken_users_file_is_refused_by_name_and_the_old_users_keep_working(proxies, target):
    p = proxies({"alice": {"password": "a-pass"}})
    f = flow(p.proc.address, target.port, "alice", "a-pass")
    write_atomically(
        p.users_path,
        users_toml({"alice": {"password": "a-pass"}}) + '[users.zed]\npassword = "nope"\n',
    )
    result = p.reload_cli()
    assert result.returncode == 2
    assert "users.zed.password" in result.stderr and "users.toml" in result.stderr
    failed = p.proc.wait_for("reload_failed")
    assert "users.zed.password" in failed["error"]
    s, (rep, _, _) = open_tunnel(
        p.proc.address, "127.0.0.1", target.port, auth=(b"alice", b"a-pass")
    )
    s.close()
    assert rep == 0
    assert f.alive() and f.finish()


def test_watched_users_file_is_picked_up_within_two_seconds(proxies, target):
    users = {"alice": {"password": "a-pass"}}
    p = proxies(users, extra="")
    text = p.proc.config_path.read_text().replace(
        'users_file = "users.toml"\n', 'users_file = "users.toml"\nwatch = true\n'
    )
    p.proc.config_path.write_text(text)
    assert p.reload()["ok"]
    users["grace"] = {"password": "g-pass"}
    _hash("g-pass")  # hashed before the clock starts
    write_atomically(p.users_path, users_toml(users))
    written = time.monotonic()
    while True:
        s, (rep, _, _) = open_tunnel(
            p.proc.address, "127.0.0.1", target.port, auth=(b"grace", b"g-pass")
        )
        s.close()
        if rep == 0:
            break
        assert time.monotonic() - written < 2.0, "the users file change was not picked up"
        time.sleep(0.05)
    assert time.monotonic() - written < 2.0
    p.proc.wait_for("users_file_changed")


# -- long tunnels, many reloads -----------------------------------------------------


def test_a_flowing_tunnel_survives_20_reloads_over_a_minute(proxies, target):
    """shutdown_timeout = 1: a reload that replaced workers would cut it within ~6 s."""
    users = {"alice": {"password": "a-pass"}}
    p = proxies(users)
    pids = p.worker_pids()
    f = flow(p.proc.address, target.port, "alice", "a-pass")
    started = time.monotonic()
    for i in range(20):
        users[f"user{i}"] = {"password": "a-pass"}  # a real change each time
        p.set(users)
        outcome = p.reload()
        assert outcome["ok"] and outcome["revoked_total"] == 0
        assert f.alive(), f"cut by reload {i + 1}"
        time.sleep(max(0.0, started + 3.1 * (i + 1) - time.monotonic()))
    lasted = time.monotonic() - started
    assert lasted > 60
    assert f.alive() and f.finish()
    print(f"one tunnel through 20 reloads: {lasted:.1f} s, {f.nsent:,} bytes each way, equal")
    assert f.nsent > 1_000_000  # ~200 KiB/s for a minute, every byte back
    assert p.worker_pids() == pids
    assert p.proc.named("worker_exited") == []


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_100_reloads_under_load_fail_no_tunnel_and_grow_nothing(proxies, target):
    users = {"alice": {"password": "a-pass"}}
    p = proxies(users)
    supervisor = p.proc.proc.pid
    pids = p.worker_pids()
    ok = [0]
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                s, (rep, _, _) = open_tunnel(
                    p.proc.address, "127.0.0.1", target.port, auth=(b"alice", b"a-pass")
                )
                s.sendall(b"x" * 100)
                assert recv_exact(s, 100) == b"x" * 100
                s.close()
                assert rep == 0
                ok[0] += 1
            except (OSError, AssertionError) as exc:
                failures.append(repr(exc))
            time.sleep(0.001)

    # Logged in once per worker before the load: four first logins at once would each
    # run scrypt (16 MiB apiece, kept by the allocator's per-thread arenas) during the
    # measurement, which is the pool's high-water mark, not a reload's growth.
    for _ in range(20):
        s, (rep, _, _) = open_tunnel(
            p.proc.address, "127.0.0.1", target.port, auth=(b"alice", b"a-pass")
        )
        s.close()
        assert rep == 0
    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        for i in range(10):  # warm-up: caches, pools and allocator arenas settle
            users["bob"] = {"password": "a-pass", "max_tunnels": 100 + i}
            p.set(users)
            assert p.reload()["ok"]
        before = {pid: (_fds(pid), _rss_kib(pid)) for pid in pids | {supervisor}}
        opened = ok[0]
        for i in range(100):
            users["bob"] = {"password": "a-pass", "max_tunnels": 200 + i}
            p.set(users)
            outcome = p.reload()
            assert outcome["ok"] and outcome["workers_answered"] == 2
        after = {pid: (_fds(pid), _rss_kib(pid)) for pid in pids | {supervisor}}
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
    assert failures == []
    assert ok[0] - opened > 200, "the load ran during the reloads"
    assert p.worker_pids() == pids
    for pid in before:
        fds0, rss0 = before[pid]
        fds1, rss1 = after[pid]
        # Open tunnels of the load come and go: a few fds either way, no trend.
        assert fds1 - fds0 <= 8, f"pid {pid}: {fds0} -> {fds1} fds after 100 reloads"
        assert rss1 - rss0 < 4096, f"pid {pid}: RSS {rss0} -> {rss1} KiB after 100 reloads"
    print(f"reload figures: before {before}, after {after}, tunnels {ok[0]}")


def test_a_new_worker_count_spawns_or_drains_only_the_slots_concerned(proxies, target):
    p = proxies({"alice": {"password": "a-pass"}}, workers=2)
    before = p.worker_pids()
    p.set(workers=3)
    grown = p.reload()
    assert grown["workers_spawned"] == 1 and grown["workers_answered"] == 2
    p.proc.wait_count("worker_ready", 3)
    assert before < p.worker_pids() and len(p.worker_pids()) == 3
    p.set(workers=1)
    shrunk = p.reload()
    assert shrunk["workers_drained"] == 2 and shrunk["workers_replaced"] == 0
    p.proc.wait_count("worker_exited", 2)
    (left,) = p.worker_pids()
    assert left in before  # slot 0's worker, never replaced
    for _ in range(5):
        s, (rep, _, _) = open_tunnel(
            p.proc.address, "127.0.0.1", target.port, auth=(b"alice", b"a-pass")
        )
        s.close()
        assert rep == 0
