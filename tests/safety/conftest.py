"""Shared pieces of the safety tests (fuzzing, faults, resource exhaustion).

Owns: the `spawn` fixture (socksd processes stopped at teardown), reading a worker's
pid, fds, RSS and CPU time from /proc, a threaded target that serves on a listening
socket made by the caller (so it can live in a network namespace), and a hand-made
SOCKS5 CONNECT on a socket the caller created.
Must not: start anything it does not stop, or wait without a bound.
"""

from __future__ import annotations

import collections
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    TIMEOUT,
    Socksd,
    TargetServer,
    echo,
    encode_request,
    read_reply,
    recv_all,
    recv_exact,
)

# Events that mean "an exception escaped a handler": each must never appear.
CRASH_EVENTS = ("session_crashed", "loop_callback_crashed", "tunnel_crashed", "accept_failed")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Socksd]]:
    """Start socksd with a config (and an optional argv prefix); stopped at teardown.

    Teardown asserts a clean exit (0 on SIGTERM): a worker hurt by the test would
    show up here too.
    """
    started: list[Socksd] = []

    def start(config_text: str, prefix: tuple[str, ...] = ()) -> Socksd:
        proc = Socksd(config_text, tmp_path, prefix=prefix)
        started.append(proc)
        return proc

    yield start
    codes = [proc.stop() for proc in started]
    assert codes == [0] * len(codes), f"socksd exit codes on SIGTERM: {codes}"


@pytest.fixture
def echo_target() -> Iterator[TargetServer]:
    server = TargetServer(echo)
    yield server
    server.close()


# -- /proc ---------------------------------------------------------------------------


def children_of(pid: int) -> set[int]:
    """Direct children of `pid` (all its threads' children)."""
    out: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(c) for c in f.read().split())
        except FileNotFoundError:
            continue  # the thread ended meanwhile
    return out


def worker_pid(proc: Socksd) -> int:
    """The pid of the only worker (`workers = 1`): the supervisor's one child."""
    ready = proc.wait_for("worker_ready")
    kids = children_of(proc.proc.pid)
    assert kids == {ready["pid"]}, f"supervisor children {kids}, worker_ready pid {ready['pid']}"
    return int(ready["pid"])


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    # Field 2 (comm) is in parentheses and may contain spaces: split after it.
    return text.rpartition(")")[2].split()  # [0] is field 3 (state)


def start_time(pid: int) -> int:
    """Field 22 (starttime): with the pid, it identifies one process across pid reuse."""
    return int(_stat_fields(pid)[19])


def cpu_seconds(pid: int) -> float:
    """utime + stime (fields 14 and 15) of the whole process, in seconds."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> collections.Counter[str]:
    """Open fds by kind ("socket", "pipe", "anon_inode:[eventpoll]", "/dev/null", ...)."""
    kinds: collections.Counter[str] = collections.Counter()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except FileNotFoundError:
            continue  # closed between listdir and readlink
        kind = target.partition(":[")[0] if target.startswith(("socket:", "pipe:")) else target
        kinds[kind] += 1
    return kinds


def wait_fd_count(pid: int, expected: int, timeout: float = 5.0) -> int:
    """Poll until the worker has `expected` fds (or `timeout`); return the last count."""
    deadline = time.monotonic() + timeout
    while True:
        count = fd_count(pid)
        if count == expected or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def steady_fd_count(pid: int, timeout: float = 5.0) -> int:
    """The worker's fd count once it stops changing (same for 0.3 s)."""
    deadline = time.monotonic() + timeout
    last, since = fd_count(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = fd_count(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 0.3:
            break
    return last


def crash_lines(proc: Socksd) -> list[dict[str, Any]]:
    """Crash events and any error-level line (house style: errors are never routine)."""
    return [
        e for e in list(proc.events) if e.get("event") in CRASH_EVENTS or e.get("level") == "error"
    ]


# -- targets and clients -------------------------------------------------------------


class Target:
    """Runs `handler(conn, peer)` in a thread per connection accepted on `listener`.

    The caller makes and binds the listener, so it can belong to any network
    namespace. `close()` stops accepting, shuts every live connection down (which
    wakes blocked handlers) and joins the threads.
    """

    def __init__(
        self,
        listener: socket.socket,
        handler: Callable[[socket.socket, Any], None],
        backlog: int = 1024,
    ) -> None:
        self.listener = listener
        self.port: int = listener.getsockname()[1]
        self._handler = handler
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        listener.listen(backlog)
        listener.settimeout(0.1)  # accept() polls the stop flag
        self._acceptor = threading.Thread(target=self._serve, daemon=True)
        self._acceptor.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            conn.settimeout(TIMEOUT * 3)
            with self._lock:
                self._live.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()]
                thread = threading.Thread(target=self._run, args=(conn, peer), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket, peer: Any) -> None:
        try:
            self._handler(conn, peer)
        except OSError:
            pass  # the test asserts on what the client saw
        finally:
            with self._lock:
                self._live.discard(conn)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(TIMEOUT)
        self.listener.close()
        with self._lock:
            live, threads = list(self._live), list(self._threads)
        for conn in live:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(TIMEOUT)


def connect_via(
    sock: socket.socket, proxy: tuple[str, int], host: str, port: int
) -> tuple[int, str, int]:
    """SOCKS5 no-auth CONNECT on a fresh socket made by the caller; returns the reply."""
    sock.settimeout(TIMEOUT)
    sock.connect(proxy)
    sock.sendall(b"\x05\x01\x00")
    assert recv_exact(sock, 2) == b"\x05\x00"
    sock.sendall(encode_request(host, port))
    return read_reply(sock)


def echo_roundtrip(sock: socket.socket, size: int, chunk: int = 64 * 1024) -> None:
    """Send `size` random bytes through an echo tunnel, half-close, and check that
    exactly the same bytes (SHA-256) come back before EOF."""
    data = os.urandom(size)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            view = memoryview(data)
            for i in range(0, size, chunk):
                sock.sendall(view[i : i + chunk])
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        back = recv_all(sock)
    finally:
        sender.join(TIMEOUT)
    assert not errors, errors
    assert len(back) == size, f"echoed {len(back)} of {size} bytes"
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
