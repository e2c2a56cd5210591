"""Instructions per tunnel: socksd's user-space cost, counted rather than timed.

    python bench/instructions.py [--tunnels 2000] [--against REV ...] [--floor]
        [--paths auth-name,auth-ip,noauth-name,noauth-ip|all]

Run as root, with the dev venv's `python` (it has socksd's dependencies).

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
`git archive`); --floor also measures bench/floor.py (no auth + IPv4 only). Ratios are
against the first column (the working tree) on the same path.

--paths counts each tunnel path of perf.py --paths (default noauth-ip, the tunnel
above): auth-name is the customer's (RFC 1929 user/password, then CONNECT to the
hostname bench.test), auth-ip, noauth-name. socksd runs with one user on the auth
paths; its warm-up fills the worker's cache of verified passwords, so scrypt is not
in the count (a customer's steady traffic finds it warm too). On the hostname paths
socksd resolves through dnsmasq in the namespace, as in perf.py: the count then
includes glibc's getaddrinfo in the resolver thread (callgrind counts every thread
of the worker), not dnsmasq. Each path also gets its ratio to noauth-ip: what the
handshake costs in instructions. Root is needed for the namespace. Not part of the
tests.
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


def measure(
    bench: perf.Bench,
    tmp: Path,
    label: str,
    tunnels: int,
    floor: bool,
    path: perf.TunnelPath,
    user_hash: str | None,
) -> float:
    """Instructions per tunnel of one column on one path."""
    out = tmp / f"cg-{len(list(tmp.glob('cg-*')))}"
    out.mkdir()
    log = out / "log"
    if floor:
        cwd = tmp
        argv = [sys.executable, str(BENCH / "floor.py"), perf.HOST, str(perf.PROXY_PORT)]
    else:
        cwd = _snapshot(label, tmp)
        # The same config as perf.py's socksd columns, with the user on the auth paths.
        config = perf.socksd_config(out, "ir", 1, user_hash if path.auth else None)
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
        load_args = perf.path_args(path, bench.settings)
        bench.tunnels(worker, WARMUP, load_args)  # type: ignore[arg-type]
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
        result = bench.tunnels(worker, tunnels, load_args)  # type: ignore[arg-type]
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
        time.sleep(1.0)
        ok = int(result["tunnels_ok"].value)
        if ok != tunnels:
            failures = result["tunnels_per_s"].failures
            raise RuntimeError(f"{label} {path.key}: {ok} of {tunnels} tunnels ok: {failures}")
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
    ap.add_argument(
        "--paths",
        default=perf.DEFAULT_PATH,
        metavar="LIST",
        help=f"tunnel paths, comma-separated from {','.join(perf.PATHS)}, or all "
        f"(default {perf.DEFAULT_PATH})",
    )
    args = ap.parse_args()
    paths = perf.path_list(ap, args.paths)
    if os.geteuid() != 0:
        print("needs root (it creates a network namespace)", file=sys.stderr)
        return 2
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("needs valgrind: apt-get install valgrind", file=sys.stderr)
        return 2
    if any(perf.PATHS[p].name for p in paths) and shutil.which("dnsmasq") is None:
        print("the hostname paths need dnsmasq: apt-get install dnsmasq-base", file=sys.stderr)
        return 2
    columns = [("working tree", False)] + [(rev, False) for rev in args.against]
    if args.floor:
        columns.append(("bench/floor.py", True))
    tmp = Path(tempfile.mkdtemp(prefix="socksd-instructions-"))
    try:
        perf.build_tools(tmp)
        auth = any(perf.PATHS[p].auth for p in paths)
        hashed = perf.user_hash(sys.executable, ROOT) if auth else None
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
            paths=paths,
        )
        with NetNS("socksd-ir") as ns:
            bench = perf.Bench(ns, tmp, settings, load)
            try:
                count_paths(bench, tmp, args.tunnels, columns, paths, hashed)
            finally:
                bench.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def count_paths(
    bench: perf.Bench,
    tmp: Path,
    tunnels: int,
    columns: list[tuple[str, bool]],
    paths: tuple[str, ...],
    hashed: str | None,
) -> None:
    """Count every column on every path (each printed as it comes), then the ratios."""
    figures: dict[tuple[str, str], float] = {}
    for key in paths:
        for label, floor in columns:
            if floor and key != perf.DEFAULT_PATH:
                continue  # floor.py speaks no-auth + IPv4 only
            per_tunnel = measure(bench, tmp, label, tunnels, floor, perf.PATHS[key], hashed)
            figures[(label, key)] = per_tunnel
            print(f"{label:>24} {key:12}: {per_tunnel:10,.0f} instructions per tunnel", flush=True)
    print(
        f"\nRatios: to the working tree on the same path; to the same column on {perf.DEFAULT_PATH}"
    )
    for key in paths:
        print(f"{perf.PATHS[key].label} ({key}):")
        for label, _ in columns:
            if (label, key) not in figures:
                continue
            per_tunnel = figures[(label, key)]
            line = f"{label:>24}: {per_tunnel:10,.0f} instructions per tunnel"
            line += f" ({per_tunnel / figures[(columns[0][0], key)]:.2f}x the working tree"
            base = figures.get((label, perf.DEFAULT_PATH))
            if key != perf.DEFAULT_PATH and base:
                line += f", {per_tunnel / base:.2f}x its {perf.DEFAULT_PATH}"
            print(line + ")")


if __name__ == "__main__":
    sys.exit(main())
