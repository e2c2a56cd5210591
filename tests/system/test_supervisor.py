"""The real `socksd` command with several workers: stats, kill -9, reload, stop, notify."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from tests.integration.helpers import (
    REPO,
    TIMEOUT,
    Socksd,
    TargetServer,
    echo,
    open_tunnel,
    recv_exact,
)

BASE = (
    'listen = ["127.0.0.1:0"]\nworkers = {workers}\nshutdown_timeout = {grace}\n'
    "[stats]\ninterval = 0.1\nheartbeat_timeout = {hb}\n"
)


def _config(workers: int = 2, grace: float = 10.0, hb: float = 5.0, extra: str = "") -> str:
    return BASE.format(workers=workers, grace=grace, hb=hb) + extra


@pytest.fixture
def socksd(tmp_path):
    started: list[Socksd] = []

    def start(config: str, env: dict[str, str] | None = None) -> Socksd:
        old = dict(os.environ)
        os.environ.update(env or {})
        try:
            proc = Socksd(config, tmp_path)
        finally:
            os.environ.clear()
            os.environ.update(old)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            os.killpg(proc.proc.pid, signal.SIGKILL)
        proc.stop()


@pytest.fixture
def target():
    server = TargetServer(echo)
    yield server
    server.close()


def _stats(proc: Socksd) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "socksd", "stats", "--json", "--socket", str(proc.control_path)],
        capture_output=True,
        cwd=REPO,
        timeout=20,
        check=True,
    )
    return orjson.loads(out.stdout)


def _workers(proc: Socksd) -> dict[int, int]:
    """slot -> pid of the current generation, from the supervisor's stats."""
    agg = _stats(proc)
    gen = agg["supervisor"]["generation"]
    return {w["slot"]: w["pid"] for w in agg["workers"] if w["gen"] == gen}


def _title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def _roundtrip(proxy: tuple[str, int], port: int, size: int = 4096) -> int:
    s, (rep, _, _) = open_tunnel(proxy, "127.0.0.1", port)
    try:
        assert rep == 0
        data = os.urandom(size)
        s.sendall(data)
        assert recv_exact(s, size) == data
    finally:
        s.close()
    return size


def test_workers_titles_and_stats_totals(socksd, target):
    proc = socksd(_config(workers=2))
    assert _title(proc.proc.pid).startswith("socksd: supervisor [")
    pids = _workers(proc)
    assert sorted(pids) == [0, 1]
    for slot, pid in pids.items():
        assert _title(pid) == f"socksd: worker {slot}"
    pushed = sum(_roundtrip(proc.address, target.port, 1000 + i) for i in range(40))
    deadline = time.monotonic() + 10
    while True:
        total = _stats(proc)["total"]["counters"]
        if total.get("tunnels_closed") == 40 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert total["tunnels_opened"] == 40 and total["tunnels_closed"] == 40
    assert total["bytes_up"] == pushed and total["bytes_down"] == pushed
    assert total["replies"] == {"0": 40}
    human = subprocess.run(
        [sys.executable, "-m", "socksd", "stats", "--config", str(proc.config_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=20,
        check=True,
    ).stdout
    assert "total" in human and f"127.0.0.1:{target.port}" in human


class _Load:
    """Threads opening short tunnels in a loop; records every failure with its time."""

    def __init__(self, proxy: tuple[str, int], port: int, threads: int = 4) -> None:
        self.proxy, self.port = proxy, port
        self.ok = 0
        self.failures: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                _roundtrip(self.proxy, self.port, 256)
            except (OSError, AssertionError) as exc:
                with self._lock:
                    self.failures.append((started, repr(exc)))
            else:
                with self._lock:
                    self.ok += 1

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(TIMEOUT * 2)


def test_kill9_worker_is_replaced_and_its_accept_queue_survives(socksd, target):
    proc = socksd(_config(workers=2))
    pids = _workers(proc)
    load = _Load(proc.address, target.port)
    try:
        time.sleep(0.3)
        # Freeze worker 0 so connections hashed to its slot wait in its accept queue.
        # Tunnels it had accepted before this moment are its own: they may fail.
        os.kill(pids[0], signal.SIGSTOP)
        frozen_at = time.monotonic()
        queued = []
        for _ in range(24):
            s = socket.create_connection(proc.address, timeout=TIMEOUT)
            s.sendall(b"\x05\x01\x00")
            queued.append(s)
        time.sleep(0.3)
        os.kill(pids[0], signal.SIGKILL)
        proc.wait_for("worker_exited", lambda e: e["worker_pid"] == pids[0])
        proc.wait_for("worker_spawned", lambda e: e["worker"] == 0 and e["worker_pid"] != pids[0])
        # Every queued connection is served by worker 0's successor: none was reset.
        for s in queued:
            assert recv_exact(s, 2) == b"\x05\x00"
            s.close()
        time.sleep(0.5)
    finally:
        load.stop()
    assert load.ok > 20
    late = [f for f in load.failures if f[0] >= frozen_at]
    assert late == [], "tunnels failed although the killed worker owned none"
    assert len(load.failures) <= 4, "at most one in-flight tunnel per load thread"
    new = _workers(proc)
    assert new[0] != pids[0] and new[1] == pids[1]


def test_sighup_reload_cuts_nothing_and_loses_no_new_tunnel(socksd, target):
    proc = socksd(_config(workers=2))
    pids = _workers(proc)
    long_lived = []
    for _ in range(6):
        s, (rep, _, _) = open_tunnel(proc.address, "127.0.0.1", target.port)
        assert rep == 0
        long_lived.append((s, hashlib.sha256(), hashlib.sha256()))
    for s, sent, got in long_lived:
        chunk = os.urandom(50_000)
        sent.update(chunk)
        s.sendall(chunk)
        got.update(recv_exact(s, len(chunk)))
    load = _Load(proc.address, target.port)
    try:
        time.sleep(0.3)
        proc.proc.send_signal(signal.SIGHUP)
        done = proc.wait_for("reload_done")
        time.sleep(0.5)
    finally:
        load.stop()
    assert load.ok > 20
    assert load.failures == []
    for s, sent, got in long_lived:
        chunk = os.urandom(50_000)
        sent.update(chunk)
        s.sendall(chunk)
        got.update(recv_exact(s, len(chunk)))
        s.close()
        assert sent.hexdigest() == got.hexdigest()
    assert done["workers_answered"] == 2 and done["revoked_total"] == 0
    assert _stats(proc)["supervisor"]["reloads"] == 1
    assert _workers(proc) == pids, "a reload replaces no worker"
    assert proc.named("worker_exited") == []


def test_sighup_with_broken_config_keeps_serving(socksd, target):
    proc = socksd(_config(workers=1))
    good = proc.config_path.read_text()
    proc.config_path.write_text(good + "\n[timeouts]\nconect = 1\n")
    proc.proc.send_signal(signal.SIGHUP)
    failed = proc.wait_for("reload_failed")
    assert "timeouts.conect" in failed["error"]
    _roundtrip(proc.address, target.port)
    assert _stats(proc)["supervisor"]["reloads"] == 0


def test_sigterm_drains_open_tunnels_then_exits_zero(socksd, target):
    proc = socksd(_config(workers=2, grace=10.0))
    s, (rep, _, _) = open_tunnel(proc.address, "127.0.0.1", target.port)
    assert rep == 0
    started = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    proc.wait_for("worker_draining", lambda e: e["open"] == 1)
    for _ in range(5):  # the tunnel still works during the drain
        data = os.urandom(10_000)
        s.sendall(data)
        assert recv_exact(s, len(data)) == data
    # While draining, new clients are refused at once, not queued and reset at exit.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proc.address, timeout=TIMEOUT).close()
    s.close()
    assert proc.proc.wait(TIMEOUT) == 0
    assert time.monotonic() - started < 8
    stopped = proc.named("worker_stopped")
    assert all(e["cut_connections"] == 0 for e in stopped)


def test_sd_notify_messages(socksd, tmp_path, target):
    path = str(tmp_path / "notify.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    sink.settimeout(TIMEOUT)
    try:
        proc = socksd(_config(workers=2), env={"NOTIFY_SOCKET": path})

        def until(field: str) -> str:
            while True:
                msg = sink.recv(4096).decode()
                if field in msg.split("\n"):
                    return msg

        ready = until("READY=1")
        assert "STATUS=" in ready
        proc.proc.send_signal(signal.SIGHUP)
        reloading = until("RELOADING=1")
        assert "MONOTONIC_USEC=" in reloading
        until("READY=1")
        proc.proc.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        assert proc.proc.wait(TIMEOUT) == 0
    finally:
        sink.close()


def test_hung_worker_is_killed_and_replaced(socksd, target):
    proc = socksd(_config(workers=1, hb=0.5))
    pid = _workers(proc)[0]
    os.kill(pid, signal.SIGSTOP)  # silent: no stats line any more
    hung = proc.wait_for("worker_hung", timeout=5)
    assert hung["worker_pid"] == pid
    proc.wait_for("worker_spawned", lambda e: e["worker_pid"] != pid, timeout=15)
    proc.wait_count("supervisor_ready", 1)
    _roundtrip(proc.address, target.port)


def test_metrics_endpoint(socksd, target):
    proc = socksd(_config(workers=1, extra='[metrics]\nlisten = "127.0.0.1:0"\n'))
    ready = proc.wait_for("supervisor_ready")
    _roundtrip(proc.address, target.port)
    url = f"http://{ready['metrics']}/metrics"
    deadline = time.monotonic() + 10
    while True:
        body = urllib.request.urlopen(url, timeout=TIMEOUT).read().decode()
        if 'socksd_tunnels_closed_total{worker="0"} 1' in body or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert 'socksd_tunnels_closed_total{worker="0"} 1' in body
    assert "# TYPE socksd_egress_open_sockets gauge" in body


BOOT_FAILURE = """
import sys
from socksd import logs
from socksd.config import load_config
from socksd.supervisor import Supervisor

def entry(config, listeners, slot, gen, stats_fd, supervisor_pid, channel):
    raise RuntimeError("worker boot exploded")  # e.g. an import error inside the worker

config = load_config(sys.argv[1])
logs.configure("info")
sys.exit(Supervisor(config, lambda: config, entry).run())
"""


def test_worker_boot_failure_stops_the_supervisor(tmp_path):
    """A worker that dies before it is ready makes the supervisor exit 3, not loop."""
    config = tmp_path / "c.toml"
    config.write_text(
        f'listen = ["127.0.0.1:0"]\nworkers = 2\n[control]\nsocket = "{tmp_path}/c.sock"\n'
    )
    result = subprocess.run(
        [sys.executable, "-c", BOOT_FAILURE, str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert result.returncode == 3, result.stderr
    assert "worker 0 failed to boot" in result.stderr or "worker 1 failed to boot" in result.stderr
    assert "worker boot exploded" in result.stderr  # the child's traceback
    spawned = result.stdout.count('"worker_spawned"')
    assert 1 <= spawned <= 2, "no respawn loop"
    assert not (tmp_path / "c.sock").exists()


def test_reload_opens_added_and_closes_removed_listen_addresses(socksd, target):
    """Added: served at once by the running workers. Removed: no new client, while a
    tunnel accepted on it keeps flowing to its normal end."""
    proc = socksd(_config(workers=2))
    pids = _workers(proc)
    host, port = proc.address
    text = proc.config_path.read_text()
    grown = text.replace('listen = ["127.0.0.1:0"]', f'listen = ["{host}:{port}", "127.0.0.2:0"]')
    proc.config_path.write_text(grown)
    proc.proc.send_signal(signal.SIGHUP)
    done = proc.wait_for("reload_done")
    assert len(done["listen"]) == 2 and done["changed"] == ["listen"]
    added = done["listen"][1]
    added_addr = (added.rpartition(":")[0], int(added.rpartition(":")[2]))
    for _ in range(8):  # SO_REUSEPORT spreads them over both workers' new sockets
        _roundtrip(added_addr, target.port)
    _roundtrip(proc.address, target.port)
    s, (rep, _, _) = open_tunnel(added_addr, "127.0.0.1", target.port)
    assert rep == 0
    proc.config_path.write_text(
        text.replace('listen = ["127.0.0.1:0"]', f'listen = ["{host}:{port}"]')
    )
    proc.proc.send_signal(signal.SIGHUP)
    proc.wait_count("reload_done", 2)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(added_addr, timeout=TIMEOUT).close()
    data = os.urandom(100_000)  # the tunnel accepted on the removed address flows on
    s.sendall(data)
    assert recv_exact(s, len(data)) == data
    s.shutdown(socket.SHUT_WR)
    assert s.recv(1) == b""
    s.close()
    _roundtrip(proc.address, target.port)
    closed = proc.wait_for(
        "tunnel_closed",
        lambda e: (
            e.get("client", "").startswith("127.0.0.1:")
            and e.get("ingress_ip") == "127.0.0.2"
            and e["bytes_up"] == 100_000
        ),
    )
    assert closed["reason"] == "eof"
    assert _workers(proc) == pids and proc.named("worker_exited") == []


def test_idle_control_clients_cannot_wedge_the_supervisor(socksd, target):
    proc = socksd(_config(workers=1))
    idle = [socket.socket(socket.AF_UNIX) for _ in range(40)]
    try:
        for s in idle:
            s.connect(str(proc.control_path))  # and never send a command
        started = time.monotonic()
        stats = _stats(proc)  # served once the idle ones time out (5 s) at the latest
        assert stats["supervisor"]["workers_wanted"] == 1
        assert time.monotonic() - started < 15
        _roundtrip(proc.address, target.port)
    finally:
        for s in idle:
            s.close()


def test_periodic_stats_log_event(socksd, target):
    proc = socksd(
        _config(workers=1).replace("interval = 0.1", "interval = 0.1\nlog_interval = 0.5")
    )
    _roundtrip(proc.address, target.port, 777)
    event = proc.wait_for("stats", lambda e: e["counters"].get("tunnels_closed") == 1)
    assert event["counters"]["bytes_up"] == 777 and event["counters"]["bytes_down"] == 777
    assert event["role"] == "supervisor"
