"""Soak with faults: many clients through two workers while workers die and socksd reloads.

What is proved, and why each claim is true by design:

- Tunnels: 16 client threads loop over tunnels to a loopback echo target, each moving
  64 KiB-1 MiB of random bytes up while reading the echo, half-closing, and checking
  the SHA-256 of what came back before EOF. Meanwhile the test kill -9s a worker three
  times (each while it holds open tunnels; the third after a reload) and sends SIGHUP
  once. Only a killed worker may lose tunnels: the supervisor keeps every slot socket,
  so a killed worker's accept queue waits for its successor, and a reload is applied
  in place by the running workers (none is replaced). So every tunnel must succeed unless
  (a) no worker that was not killed logged a `tunnel_closed` line for it, and
  (b) it was open while a kill was in flight (from `os.kill` until the test saw that
      worker's `worker_exited`).
  A failed connect() to the proxy is never excused (the supervisor holds the listeners).
  Ownership is read from the log: a `tunnel_closed` line carries `client` ("ip:port",
  our socket's own address) and the worker's `pid`. Loopback reuses client ports within
  the test (tcp_tw_reuse = 2), so a line belongs to the latest tunnel from its address
  that started before the line's timestamp. A worker that was not killed writes a line
  for every session it ends (its buffer is flushed every loop tick and at exit), so a
  failed tunnel with such a line was cut without excuse. A success has at most one
  line and it says what the client saw (reply 0, reason eof, its size both ways); a
  success with no line at all is allowed only if a kill was sent while it ran or within
  2 s after (a killed worker loses the lines still in its buffer).
  No worker that was not killed exits, killed workers show -9, and no crash, hang or
  error-level line appears.

- Figures: each worker reports totals since it started; the supervisor sums the live
  workers' latest totals with `retired` (the last totals of every reaped worker). So:
  1. Polled every 0.2 s throughout, every total and every worker's counters never
     decrease and nothing is negative.
  2. For each worker alive at the end, once idle, its counters equal its own log lines
     exactly: tunnels_opened = tunnels_closed = its reply-0 `tunnel_closed` lines, the
     replies sum to all its `tunnel_closed` lines, bytes_up/bytes_down are the sums over
     its reply-0 lines, handshake failures equal its `handshake_failed` lines, and
     accepted = both kinds of lines (every session ends in exactly one of them).
  3. Gracefully exited workers report final totals in their `bye`, so
     total - (the lines of every worker that was not killed) is what the killed
     workers last reported. That is at least what the test polled from each of them
     just before the kill (a worker's totals only grow) and at most what the clients
     without a line from a surviving worker could have caused (one accept and one close
     per connection; bytes at most what such a client sent). Hence also total
     tunnels_closed >= the successes owned by workers that were not killed.
  Lost log lines and unsent stats of killed workers are why nothing stronger holds for
  them: what they did in their last tick is invisible.
"""

from __future__ import annotations

import hashlib
import os
import random
import selectors
import signal
import socket
import socketserver
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.integration.helpers import (
    TIMEOUT,
    Socksd,
    echo,
    encode_request,
    read_reply,
    recv_exact,
)

CONFIG = """
listen = ["127.0.0.1:0"]
workers = 2
shutdown_timeout = 10.0
[stats]
interval = 0.1
heartbeat_timeout = 5.0
"""
CLIENTS = 16
SIZES = (64 * 1024, 1024 * 1024)
TUNNEL_DEADLINE = 20.0  # per tunnel; a queued one waits at most one respawn
LOAD_SECONDS = 12.0
COUNTERS = ("accepted", "tunnels_opened", "tunnels_closed", "bytes_up", "bytes_down")
# Lines that mean an exception escaped a handler, a worker hung or a line was garbled
# (plus every error-level line: house style keeps ERROR for what is never routine).
BAD_EVENTS = (
    "session_crashed",
    "tunnel_crashed",
    "loop_callback_crashed",
    "accept_failed",
    "supervisor_handler_failed",
    "supervisor_tick_failed",
    "stats_line_invalid",
    "worker_hung",
    "unparsable_line",
)


@pytest.fixture
def socksd(tmp_path: Path) -> Iterator[Callable[[str], Socksd]]:
    started: list[Socksd] = []

    def start(config: str) -> Socksd:
        proc = Socksd(config, tmp_path)
        started.append(proc)
        return proc

    yield start
    codes = [proc.stop() for proc in started]
    assert codes == [0] * len(codes), f"exit codes on SIGTERM: {codes}"


class EchoServer(socketserver.ThreadingTCPServer):
    """A loopback echo target, one thread per connection.

    Not the helpers' `TargetServer`: socketserver's default backlog of 5 overflows under
    16 clients, and the target's kernel then resets some upstream connections (the
    final ACK is dropped, socksd's side is established and sends; ~1 s later, RST).
    socksd relays that reset faithfully, so it would look like a lost tunnel.
    """

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 1024

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.port: int = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(TIMEOUT)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(TIMEOUT * 3)
        try:
            echo(self.request, self.client_address)
        except OSError:
            pass  # a tunnel cut by a kill: the client sees it and the test judges it


@pytest.fixture
def target() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


# -- the supervisor's figures ---------------------------------------------------------


def control_stats(proc: Socksd) -> dict[str, Any]:
    """What `socksd stats --json` prints, asked directly on the control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(proc.control_path))
        sock.sendall(b"stats\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    stats: dict[str, Any] = orjson.loads(b"".join(chunks))
    return stats


def current_pid(stats: dict[str, Any], slot: int) -> int | None:
    gen = stats["supervisor"]["generation"]
    for w in stats["workers"]:
        if w["gen"] == gen and w["slot"] == slot and w["alive"]:
            return int(w["pid"])
    return None


class StatsPoller:
    """Polls the figures every 0.2 s in a thread; checks monotony as it goes."""

    def __init__(self, proc: Socksd) -> None:
        self.proc = proc
        self.samples = 0
        self.problems: list[str] = []
        self._last_total: dict[str, int] = {}
        self._last_worker: dict[int, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                stats = control_stats(self.proc)
            except (OSError, ValueError) as exc:
                self.problems.append(f"stats request failed: {exc!r}")
                continue
            self.check(stats)

    def check(self, stats: dict[str, Any]) -> None:
        self.samples += 1
        negative = _negatives(stats["total"]) + [
            n for w in stats["workers"] for n in _negatives(w["counters"]) + _negatives(w["gauges"])
        ]
        if negative:
            self.problems.append(f"negative figures {negative}")
        total = stats["total"]["counters"]
        for key in COUNTERS:
            value = total.get(key, 0)
            if value < self._last_total.get(key, 0):
                self.problems.append(f"total {key} fell {self._last_total[key]} -> {value}")
            self._last_total[key] = value
        for w in stats["workers"]:
            if not w["alive"]:
                continue
            last = self._last_worker.setdefault(w["pid"], {})
            for key in COUNTERS:
                value = w["counters"].get(key, 0)
                if value < last.get(key, 0):
                    self.problems.append(f"worker {w['pid']} {key} fell {last[key]} -> {value}")
                last[key] = value

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)


def _negatives(tree: Any, path: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [n for k, v in tree.items() for n in _negatives(v, f"{path}.{k}")]
    if isinstance(tree, int | float) and not isinstance(tree, bool) and tree < 0:
        return [f"{path}={tree}"]
    return []


# -- clients ---------------------------------------------------------------------------


@dataclass
class Tunnel:
    size: int
    started: float  # monotonic, before connect()
    wall_started: float  # time.time(), to compare with log timestamps
    client: str | None = None  # "ip:port" of our socket, as the proxy logs it
    ended: float = 0.0
    ok: bool = False
    error: str = ""
    received: int = 0


@dataclass
class Load:
    proxy: tuple[str, int]
    port: int
    pool: bytes
    tunnels: list[Tunnel] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            size = rng.randint(*SIZES)
            offset = rng.randrange(len(self.pool) - size)
            data = memoryview(self.pool)[offset : offset + size]
            tunnel = Tunnel(size, time.monotonic(), time.time())
            with self.lock:
                self.tunnels.append(tunnel)
            try:
                tunnel_through(self.proxy, self.port, data, tunnel, rng)
            except (OSError, AssertionError) as exc:
                tunnel.error = repr(exc)
            except Exception as exc:  # noqa: BLE001 - a client bug must fail the test, not hide
                tunnel.error = repr(exc)
                self.crashes.append(repr(exc))
            tunnel.ended = time.monotonic()


def tunnel_through(
    proxy: tuple[str, int], port: int, data: memoryview, tunnel: Tunnel, rng: random.Random
) -> None:
    """CONNECT, then send `data` while reading the echo; half-close after the last byte;
    `tunnel.ok` when exactly the same bytes came back before EOF."""
    expected = hashlib.sha256(data).hexdigest()
    deadline = time.monotonic() + TUNNEL_DEADLINE
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(proxy)
        tunnel.client = "{}:{}".format(*sock.getsockname())
        sock.sendall(b"\x05\x01\x00")
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(encode_request("127.0.0.1", port))
        rep, _, _ = read_reply(sock)
        assert rep == 0, f"reply {rep}"
        sock.setblocking(False)
        got = hashlib.sha256()
        sent = 0
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"sent {sent}, got {tunnel.received} of {len(data)}")
                for _, mask in sel.select(min(left, 1.0)):
                    if mask & selectors.EVENT_WRITE:
                        try:
                            sent += sock.send(data[sent : sent + rng.randint(1, 256 * 1024)])
                        except BlockingIOError:
                            pass
                        if sent == len(data):
                            sock.shutdown(socket.SHUT_WR)
                            sel.modify(sock, selectors.EVENT_READ)
                    if mask & selectors.EVENT_READ:
                        try:
                            chunk = sock.recv(256 * 1024)
                        except BlockingIOError:
                            continue
                        if not chunk:
                            tunnel.ok = sent == len(data) and got.hexdigest() == expected
                            if not tunnel.ok:
                                tunnel.error = f"EOF after {tunnel.received} of {len(data)}"
                            return
                        got.update(chunk)
                        tunnel.received += len(chunk)


# -- faults ------------------------------------------------------------------------------


@dataclass
class Kill:
    pid: int
    slot: int
    sent: float  # monotonic, just before os.kill
    exited: float  # monotonic, when the test saw `worker_exited`
    before: dict[str, int]  # the worker's counters polled just before the kill


def kill_worker(proc: Socksd, slot: int) -> Kill:
    """kill -9 the current worker of `slot` once it holds a tunnel; wait for its
    successor's `worker_ready`."""
    deadline = time.monotonic() + 3.0
    while True:
        stats = control_stats(proc)
        pid = current_pid(stats, slot)
        worker = next((w for w in stats["workers"] if w["pid"] == pid), None)
        if worker and worker["gauges"].get("open_tunnels", 0) > 0:
            break
        assert time.monotonic() < deadline, f"slot {slot} never held a tunnel: {stats}"
        time.sleep(0.05)
    assert pid is not None and worker is not None
    spawns = len([e for e in proc.named("worker_spawned") if e["worker"] == slot])
    sent = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    proc.wait_for("worker_exited", lambda e: e["worker_pid"] == pid)
    exited = time.monotonic()
    successor = proc.wait_count("worker_spawned", spawns + 1, lambda e: e["worker"] == slot)[-1]
    proc.wait_for("worker_ready", lambda e: e.get("pid") == successor["worker_pid"])
    before = {k: worker["counters"].get(k, 0) for k in COUNTERS}
    return Kill(pid, slot, sent, exited, before)


def wall(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


# -- the test ---------------------------------------------------------------------------


def test_soak_kill9_and_reload_lose_only_the_killed_workers_tunnels(
    socksd: Callable[[str], Socksd], target: EchoServer
) -> None:
    proc = socksd(CONFIG)
    pool = random.Random(1928).randbytes(2 * SIZES[1])
    load = Load(proc.address, target.port, pool)
    threads = [threading.Thread(target=load.run, args=(i,)) for i in range(CLIENTS)]
    poller = StatsPoller(proc)
    kills: list[Kill] = []
    started = time.monotonic()
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        kills.append(kill_worker(proc, 0))
        time.sleep(1.0)
        proc.proc.send_signal(signal.SIGHUP)
        done = proc.wait_for("reload_done")
        assert done["workers_answered"] == 2 and done["workers_replaced"] == 0
        time.sleep(1.5)
        kills.append(kill_worker(proc, 1))
        time.sleep(2.0)
        kills.append(kill_worker(proc, 0))
        time.sleep(max(0.0, started + LOAD_SECONDS - time.monotonic()))
    finally:
        load.stop.set()
        for t in threads:
            t.join(TUNNEL_DEADLINE + TIMEOUT)
        poller.stop()
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    assert load.crashes == []

    killed = {k.pid for k in kills}
    spawned = {e["worker_pid"]: e for e in proc.named("worker_spawned")}
    survivors = set(spawned) - killed
    # The reload replaced nobody: the two workers alive at the end are idle and reported.
    final = settle(proc, survivors)
    poller.check(final)
    assert poller.problems == []
    assert poller.samples > 20

    exits = {e["worker_pid"]: e for e in proc.named("worker_exited")}
    assert {pid: exits[pid]["exit_code"] for pid in killed} == dict.fromkeys(killed, -9)
    gone = {pid for pid in survivors if pid in exits}
    assert gone == set(), "a worker that was not killed exited: the reload replaced it"
    bad = [e for e in proc.events if e.get("event") in BAD_EVENTS or e.get("level") == "error"]
    assert bad == []

    lines = [e for e in proc.named("tunnel_closed") if e.get("role") == "worker"]
    check_tunnels(load.tunnels, lines, kills, survivors)
    check_figures(final, proc, load.tunnels, lines, kills, survivors)


def settle(proc: Socksd, survivors: set[int]) -> dict[str, Any]:
    """Wait (at most 15 s) until both current workers are alive, idle and reported, and
    every survivor that was retired has exited; return the figures then."""
    deadline = time.monotonic() + 15.0
    while True:
        stats = control_stats(proc)
        live = [w for w in stats["workers"] if w["alive"]]
        exited = {e["worker_pid"] for e in proc.named("worker_exited")}
        gen = stats["supervisor"]["generation"]
        idle = all(
            w["gauges"].get("open_tunnels") == 0 and w["gauges"].get("open_sessions") == 0
            for w in live
        )
        # Per live worker, counters and lines are both current once they agree.
        lines = _lines_by_pid(proc)
        agree = all(w["counters"].get("accepted") == lines[w["pid"]]["sessions"] for w in live)
        if (
            len(live) == 2
            and all(w["gen"] == gen for w in live)
            and idle
            and agree
            and survivors - {w["pid"] for w in live} <= exited
        ):
            return stats
        if time.monotonic() > deadline:
            return stats  # the checks that follow say what never came right
        time.sleep(0.1)


def _lines_by_pid(proc: Socksd) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in proc.named("tunnel_closed"):
        if e.get("role") != "worker":
            continue
        row = out[e["pid"]]
        row["sessions"] += 1
        row["lines"] += 1
        row["replies_0"] += e["reply"] == 0
        if e["reply"] == 0:
            row["bytes_up"] += e["bytes_up"]
            row["bytes_down"] += e["bytes_down"]
    for e in proc.named("handshake_failed"):
        out[e["pid"]]["sessions"] += 1
        out[e["pid"]]["handshake_failed"] += 1
    return out


def _owner_lines(
    tunnels: list[Tunnel], lines: list[dict[str, Any]]
) -> dict[int, list[dict[str, Any]]]:
    """Lines per tunnel (by index): same client address, logged after that tunnel began
    and before the next tunnel from the same address began (ports can be reused)."""
    by_addr: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(tunnels):
        if t.client is not None:
            by_addr[t.client].append(i)
    for users in by_addr.values():
        users.sort(key=lambda i: tunnels[i].wall_started)
    owned: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        users = by_addr.get(line["client"], [])
        earlier = [i for i in users if tunnels[i].wall_started <= wall(line)]
        assert earlier, f"a tunnel_closed line no client of ours made: {line}"
        owned[earlier[-1]].append(line)
    return owned


def check_tunnels(
    tunnels: list[Tunnel], lines: list[dict[str, Any]], kills: list[Kill], survivors: set[int]
) -> None:
    owned = _owner_lines(tunnels, lines)
    bad: list[str] = []
    for i, t in enumerate(tunnels):
        mine = owned.get(i, [])
        theirs = [e for e in mine if e["pid"] in survivors]
        if t.ok:
            got = [
                (e["pid"], e["reply"], e["reason"], e["bytes_up"], e["bytes_down"]) for e in mine
            ]
            if mine and [g[1:] for g in got] != [(0, "eof", t.size, t.size)]:
                bad.append(f"success {t.client} of {t.size} bytes logged as {got}")
            # No line at all: only a killed worker may have lost it, before its tick ended.
            if not mine and not any(t.started <= k.sent <= t.ended + 2.0 for k in kills):
                bad.append(f"success {t.client} has no tunnel_closed line and no kill near it")
            continue
        in_flight = any(k.sent <= t.ended and k.exited >= t.started for k in kills)
        if theirs or not in_flight or t.client is None:
            bad.append(
                f"failed {t.client} ({t.error}) after {t.ended - t.started:.2f}s, size "
                f"{t.size}, received {t.received}; kill in flight: {in_flight}; lines of "
                f"workers not killed: {[_brief(e) for e in theirs]}"
            )
    oks = sum(t.ok for t in tunnels)
    failed = len(tunnels) - oks
    unlogged = sum(t.ok and not owned.get(i) for i, t in enumerate(tunnels))
    addresses = [t.client for t in tunnels if t.client]
    print(
        f"soak: {len(tunnels)} tunnels, {oks} ok ({unlogged} with no line), {failed} lost to "
        f"{len(kills)} kills; {len(addresses) - len(set(addresses))} client ports reused"
    )
    assert bad == []
    assert oks >= 50, "too little load to prove anything"
    assert failed <= len(kills) * CLIENTS


def _brief(line: dict[str, Any]) -> str:
    keys = ("pid", "gen", "reply", "reason", "bytes_up", "bytes_down", "duration_ms")
    return " ".join(f"{k}={line.get(k)}" for k in keys)


def check_figures(
    final: dict[str, Any],
    proc: Socksd,
    tunnels: list[Tunnel],
    lines: list[dict[str, Any]],
    kills: list[Kill],
    survivors: set[int],
) -> None:
    by_pid = _lines_by_pid(proc)
    assert final["supervisor"]["generation"] == 1 and final["supervisor"]["reloads"] == 1
    for w in [w for w in final["workers"] if w["alive"]]:
        c, mine = w["counters"], by_pid[w["pid"]]
        assert {
            "tunnels_closed": c["tunnels_closed"],
            "tunnels_opened": c["tunnels_opened"],
            "replies": sum(c["replies"].values()),
            "bytes_up": c["bytes_up"],
            "bytes_down": c["bytes_down"],
            "handshake_failed": sum(c.get("handshake_failures", {}).values()),
            "accepted": c["accepted"],
        } == {
            "tunnels_closed": mine["replies_0"],
            "tunnels_opened": mine["replies_0"],
            "replies": mine["lines"],
            "bytes_up": mine["bytes_up"],
            "bytes_down": mine["bytes_down"],
            "handshake_failed": mine["handshake_failed"],
            "accepted": mine["sessions"],
        }, f"worker {w['pid']}"

    # What the killed workers last reported = total - everything the others logged.
    total = final["total"]["counters"]
    logged = {
        "tunnels_closed": sum(by_pid[p]["replies_0"] for p in survivors),
        "accepted": sum(by_pid[p]["sessions"] for p in survivors),
        "bytes_up": sum(by_pid[p]["bytes_up"] for p in survivors),
        "bytes_down": sum(by_pid[p]["bytes_down"] for p in survivors),
    }
    owned = _owner_lines(tunnels, lines)
    orphans = [
        t for i, t in enumerate(tunnels) if not any(e["pid"] in survivors for e in owned.get(i, []))
    ]
    ceiling = {
        "tunnels_closed": len(orphans),
        "accepted": len(orphans),
        "bytes_up": sum(t.size for t in orphans),
        "bytes_down": sum(t.size for t in orphans),
    }
    for key, floor_sum in logged.items():
        killed_part = total[key] - floor_sum
        floor = sum(k.before[key] for k in kills)
        assert floor <= killed_part <= ceiling[key], (key, floor, killed_part, ceiling[key])
    ours = sum(
        t.ok for i, t in enumerate(tunnels) if any(e["pid"] in survivors for e in owned.get(i, []))
    )
    assert total["tunnels_closed"] >= ours
