"""Instructions per tunnel: socksd's user-space cost, counted rather than timed.

    sudo /work/venv/bin/python bench/instructions.py [--tunnels 2000] [--against REV ...] [--floor]

Runs socksd (one worker) under valgrind's callgrind (`apt-get install valgrind`) in a
throw-away network namespace, warms it with 300 tunnels, zeroes the counters, opens
--tunnels tunnels with bench/loadgen.c (the tunnel of perf.py's tunnels/s: greeting,
CONNECT, 64-byte echo, close; 16 in flight), dumps, and prints the worker's
instructions per tunnel (Ir: user space only, the kernel's share is not counted).

Why: the count does not move with the host's load. On this VM timed runs of the same
build differ by 5-30 % from one run to the next, which drowns the 2-5 % a single change
is worth; the instruction count repeats to within 0.1 %. It is a development tool for
the Python side of a tunnel (perf.py gives the figures that matter: rate, latency, CPU).

--against REV also measures git revision(s) REV (their socksd/ and workers/ from
`git archive`); --floor also measures bench/floor.py. Ratios are against the first
column (the working tree). Root is needed for the namespace. Not part of the tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import perf  # noqa: E402 - the bench's own helpers (namespace, targets, load generator)

from tests.netns import NetNS  # noqa: E402

WARMUP = 300


class _Worker:
    """What perf.Bench needs of a running proxy: the pids whose CPU it reads."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def pids(self) -> list[int]:
        return [self.pid]


def _snapshot(label: str, tmp: Path) -> Path:
    """A directory holding socksd/ and workers/ of the working tree or of a revision."""
    dest = tmp / f"src-{len(list(tmp.glob('src-*')))}"
    dest.mkdir()
    if label == "working tree":
        for pkg in ("socksd", "workers"):
            shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", label, "socksd", "workers"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _wait_for(path: Path, text: bytes, proc: subprocess.Popen[Any], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in path.read_bytes():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"not ready; log tail:\n{path.read_text(errors='replace')[-2000:]}")


def _worker_pid(proc: subprocess.Popen[Any]) -> int:
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    children = [int(p) for p in out.stdout.split()]
    if not children:
        raise RuntimeError("no worker process")
    return max(children)


def _total_ir(dump_dir: Path, pid: int) -> int:
    """Ir of the last dump callgrind wrote for `pid` (the one after zeroing)."""
    dumps = sorted(dump_dir.glob(f"cg.{pid}*"), key=os.path.getmtime)
    for line in reversed(dumps[-1].read_text().splitlines()):
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dumps[-1]}")


def measure(bench: perf.Bench, tmp: Path, label: str, tunnels: int, floor: bool) -> float:
    """Instructions per tunnel of one column."""
    out = tmp / f"cg-{len(list(tmp.glob('cg-*')))}"
    out.mkdir()
    log = out / "log"
    if floor:
        cwd = tmp
        argv = [sys.executable, str(BENCH / "floor.py"), perf.HOST, str(perf.PROXY_PORT)]
    else:
        cwd = _snapshot(label, tmp)
        config = out / "socksd.toml"
        config.write_text(
            f'listen = ["{perf.HOST}:{perf.PROXY_PORT}"]\nworkers = 1\n\n'
            f'[log]\nlevel = "info"\n\n[control]\nsocket = "{out}/control.sock"\n\n'
            '[[access.destinations]]\naction = "allow"\nto = ["127.0.0.0/8"]\n'
        )
        # `python -m` puts the cwd first on sys.path: socksd runs from the snapshot.
        argv = [sys.executable, "-m", "socksd", "--config", str(config)]
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}/cg.%p",
        "--trace-children=yes",
        "--dump-instr=no",
    ]
    with open(log, "wb") as sink:
        proc = bench.ns.popen([*valgrind, *argv], cwd=cwd, stdout=sink, stderr=sink)
    try:
        if floor:
            _wait_for(log, b"==", proc, 120.0)  # valgrind's banner; then the port opens
            for _ in range(600):
                if bench._port_open(None):  # noqa: SLF001 - the bench's own readiness probe
                    break
                time.sleep(0.2)
            pid = proc.pid
        else:
            _wait_for(log, b'"supervisor_ready"', proc, 300.0)
            pid = _worker_pid(proc)
        worker = _Worker(pid)
        bench.tunnels(worker, WARMUP)  # type: ignore[arg-type]
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
        result = bench.tunnels(worker, tunnels)  # type: ignore[arg-type]
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
        time.sleep(1.0)
        ok = int(result["tunnels_ok"].value)
        if ok != tunnels:
            raise RuntimeError(f"{label}: {ok} of {tunnels} tunnels ok")
        return _total_ir(out, pid) / tunnels
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--tunnels", type=int, default=2000, help="tunnels counted (default 2,000)")
    ap.add_argument("--against", action="append", default=[], metavar="REV", help="git revision")
    ap.add_argument("--floor", action="store_true", help="also measure bench/floor.py")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (it creates a network namespace)", file=sys.stderr)
        return 2
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("needs valgrind: apt-get install valgrind", file=sys.stderr)
        return 2
    columns = [("working tree", False)] + [(rev, False) for rev in args.against]
    if args.floor:
        columns.append(("bench/floor.py", True))
    tmp = Path(tempfile.mkdtemp(prefix="socksd-instructions-"))
    try:
        perf.build_tools(tmp)
        load, _, _ = perf.plan_cpus((1,))
        settings = perf.Settings(
            runs=1,
            tunnels=args.tunnels,
            concurrency=16,
            bulk_bytes=1,
            idle=1,
            warmup=1,
            sustained=0,
            workers=(1,),
        )
        with NetNS("socksd-ir") as ns:
            bench = perf.Bench(ns, tmp, settings, load)
            figures = []
            for label, floor in columns:
                per_tunnel = measure(bench, tmp, label, args.tunnels, floor)
                figures.append((label, per_tunnel))
                ratio = per_tunnel / figures[0][1]
                print(f"{label:>24}: {per_tunnel:10,.0f} instructions per tunnel ({ratio:.2f}x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
