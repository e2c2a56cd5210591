"""The real `socksd` command started under a low soft RLIMIT_NOFILE (as a shell gives).

`prlimit --nofile=256:4096` starts it with soft 256 / hard 4,096: the supervisor must
raise the soft limit to the hard one before forking, so each worker runs with 4,096 and
holds more than 256 connections; and it must warn when the configured tunnel limit
needs more fds than the hard limit allows.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from pathlib import Path

import pytest

from socksd.kernel import nofile_needed, tunnels_within
from tests.conftest import need
from tests.integration.helpers import TIMEOUT, Socksd, recv_exact

SOFT, HARD = 256, 4096
PRLIMIT = ("prlimit", f"--nofile={SOFT}:{HARD}")
# Over 2 workers: one of them holds at least 300, more than the soft limit at start lets
# one process hold (its accept would pause on EMFILE and the greetings go unanswered).
HELD = 600


def _config(max_tunnels_per_worker: int) -> str:
    return (
        'listen = ["127.0.0.1:0"]\nworkers = 2\nshutdown_timeout = 2.0\n'
        "[stats]\ninterval = 0.1\n"
        "[timeouts]\nhandshake = 60.0\n"  # the held connections must outlive the test
        f"[limits]\nmax_tunnels_per_worker = {max_tunnels_per_worker}\n"
    )


@pytest.fixture
def socksd(tmp_path):
    need(shutil.which("prlimit") is not None, "prlimit (util-linux) is not installed")
    started: list[Socksd] = []

    def start(config: str) -> Socksd:
        proc = Socksd(config, tmp_path, prefix=PRLIMIT)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            os.killpg(proc.proc.pid, signal.SIGKILL)
        proc.stop()


def _open_files(pid: int) -> tuple[int, int]:
    """(soft, hard) "Max open files" of a process, from /proc/<pid>/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no 'Max open files' line for pid {pid}")


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_workers_run_with_soft_raised_to_hard_and_hold_more_than_the_old_soft(socksd):
    proc = socksd(_config(max_tunnels_per_worker=1000))  # 2,561 fds needed: fits 4,096
    assert _open_files(proc.proc.pid) == (HARD, HARD)  # the supervisor (prlimit exec'd it)
    settings = proc.wait_for("kernel_settings")
    assert settings["nofile_soft_at_start"] == SOFT
    assert settings["nofile_soft"] == settings["nofile_hard"] == HARD
    spawned = [proc.wait_for("worker_spawned", lambda e, n=n: e["worker"] == n) for n in (0, 1)]
    workers = [e["worker_pid"] for e in spawned]
    for pid in workers:
        assert _open_files(pid) == (HARD, HARD)
    assert not [e for e in proc.events if e.get("event", "").startswith("nofile_")]

    # The limit is real: more connections than the old soft limit, each one answered.
    held: list[socket.socket] = []
    try:
        for _ in range(HELD):
            s = socket.create_connection(proc.address, timeout=TIMEOUT)
            held.append(s)
            s.sendall(b"\x05\x01\x00")
            assert recv_exact(s, 2) == b"\x05\x00"
        assert max(_fd_count(pid) for pid in workers) > HELD // 2 > SOFT
        assert [e for e in proc.events if e.get("event") == "accept_paused"] == []
    finally:
        for s in held:
            s.close()


def test_tunnel_limit_above_what_the_hard_limit_allows_is_warned(socksd):
    proc = socksd(_config(max_tunnels_per_worker=100_000))
    low = proc.wait_for("nofile_limit_low")
    assert low["level"] == "warning" and low["role"] == "supervisor"
    assert low["nofile_soft"] == low["nofile_hard"] == HARD
    assert low["worker_tunnel_limit"] == low["tunnels_wanted"] == 100_000
    # One listener, 4 resolver threads (the default), splice on (the default).
    assert low["nofile_needed"] == nofile_needed(100_000, 1, 4, splice=True) > HARD
    assert low["tunnels_within_limit"] == tunnels_within(HARD, 1, 4, splice=True)
    assert "LimitNOFILE=" in low["fix"]


def test_reload_to_a_limit_the_hard_limit_cannot_carry_is_warned(socksd):
    proc = socksd(_config(max_tunnels_per_worker=1000))
    assert [e for e in proc.events if e.get("event") == "nofile_limit_low"] == []
    proc.config_path.write_text(
        proc.config_path.read_text().replace(
            "max_tunnels_per_worker = 1000", "max_tunnels_per_worker = 5000"
        )
    )
    proc.proc.send_signal(signal.SIGHUP)
    low = proc.wait_for("nofile_limit_low")
    assert low["tunnels_wanted"] == 5000 and low["nofile_hard"] == HARD
    done = proc.wait_for("reload_done")  # applied regardless
    assert done["changed"] == ["limits"]
    assert done["workers_unanswered"] == done["workers_replaced"] == 0
