"""A worker whose supervisor is gone stops by itself: real processes, no supervisor.

The worker is started the way the supervisor starts it, through `run_worker()`, but by
a plain `python -c` whose parent is this test: the `supervisor_pid` it is given is the
pid of a process that has already exited, as when the supervisor dies between the fork
and the worker's reporter. Only that pid can tell the worker: getppid() is alive (this
test), and the stats pipe stays open (EPIPE would tell it too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.helpers import REPO, TIMEOUT

WORKER = """
import sys
from socksd import logs
from socksd.config import load_config
from socksd.listeners import open_slot_listeners
from workers.main import run_worker

config = load_config(sys.argv[1])
logs.configure("info")
[socks] = open_slot_listeners(config.listen, 1).values()
sys.exit(
    run_worker(
        config,
        socks,
        slot=0,
        generation=1,
        stats_fd=int(sys.argv[2]),
        supervisor_pid=int(sys.argv[3]),
    )
)
"""


def _exited_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    gone = subprocess.Popen(["true"])
    gone.wait(TIMEOUT)
    return gone.pid


def test_worker_handed_a_dead_supervisor_pid_stops(tmp_path):
    config = tmp_path / "worker.toml"
    config.write_text('listen = ["127.0.0.1:0"]\nshutdown_timeout = 5.0\n[stats]\ninterval = 0.1\n')
    r, w = os.pipe()
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(config), str(w), str(_exited_pid())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        pass_fds=(w,),
        start_new_session=True,
    )
    os.close(w)
    try:
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=TIMEOUT)
            pytest.fail(
                f"the worker still ran {TIMEOUT} s after its supervisor was gone; "
                f"log={out.decode()[-2000:]!r} stderr={err.decode()[-2000:]!r}"
            )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(TIMEOUT)
        os.close(r)  # held open until now: a broken pipe must not be what tells it
    events = [json.loads(line) for line in out.splitlines() if line.startswith(b"{")]
    names = [e.get("event") for e in events]
    assert "worker_ready" in names, err.decode()  # it booted: not a boot failure
    gone = [e for e in events if e.get("event") == "supervisor_gone"]
    assert len(gone) == 1 and gone[0]["action"] == "stopping"
    assert names.index("supervisor_gone") < names.index("worker_stopped")
    assert proc.returncode == 0
    assert time.monotonic() - started < TIMEOUT
