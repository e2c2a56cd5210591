"""Port-pressure benchmark: sustained tunnels/s to ONE target from ONE egress IP.

    sudo python bench/port_pressure.py [--seconds 10] [--ports 1000] [--delay-ms 1000]

Runs in throw-away network namespaces (root needed) with `tcp_tw_reuse = 1`, an
ephemeral range of P ports and `tcp_tw_reuse_delay` H. The peer that closes first
(here always the egress side) keeps each 4-tuple for H, so the kernel allows at most
P / H new connections per second from one IP to one target
(shared/notes/port-binding.md, section 3).

It measures, in the same run:
  1. baseline: clients connecting straight from the egress IP (NO_PORT), no proxy;
  2. socksd: the same through one socksd worker bound to that IP.
and prints the median successful tunnels per second (steady-state seconds), the
failures, and the ratios socksd / baseline and socksd / (P / H).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.netns import NetNS  # noqa: E402 - the bench reuses the tests' namespace helper

EGRESS = "127.0.0.2"
TARGET = ("127.0.0.33", 9003)
PROXY_PORT = 1080


def _setup(ns: NetNS, ports: int, delay_ms: int) -> None:
    ns.sysctl("net.ipv4.ip_local_port_range", f"50000 {50000 + ports - 1}")
    ns.sysctl("net.ipv4.tcp_tw_reuse", 1)
    ns.sysctl("net.ipv4.tcp_timestamps", 1)
    ns.sysctl("net.ipv4.tcp_tw_reuse_delay", delay_ms)


def _start_target(ns: NetNS) -> subprocess.Popen[bytes]:
    proc = ns.popen(
        [sys.executable, str(REPO / "bench" / "_target.py"), TARGET[0], str(TARGET[1])],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    return proc


def _load(ns: NetNS, mode: str, seconds: float, procs: int, threads: int, src: str) -> dict:
    argv = [
        sys.executable,
        str(REPO / "bench" / "_load.py"),
        mode,
        TARGET[0],
        str(TARGET[1]),
        str(seconds),
        str(threads),
        src,
    ]
    if mode == "socks":
        argv += [EGRESS, str(PROXY_PORT)]
    runners = [ns.popen(argv, stdout=subprocess.PIPE) for _ in range(procs)]
    per_second = [0] * int(seconds)
    failures: dict[str, int] = {}
    for r in runners:
        out, _ = r.communicate(timeout=seconds + 60)
        result = json.loads(out)
        for i, n in enumerate(result["per_second"]):
            per_second[i] += n
        for k, v in result["failures"].items():
            failures[k] = failures.get(k, 0) + v
    return {"per_second": per_second, "failures": failures}


def _steady_median(per_second: list[int]) -> float:
    # The first seconds fill the range before any TIME_WAIT quad is reusable.
    steady = per_second[2:] or per_second
    return statistics.median(steady)


def _socksd(ns: NetNS, tmp: Path) -> subprocess.Popen[bytes]:
    config = tmp / "bench.toml"
    config.write_text(
        f'listen = ["{EGRESS}:{PROXY_PORT}"]\nworkers = 1\n[log]\nlevel = "warning"\n'
        # The target lives on loopback inside the bench's namespace: opt in to it.
        '[[access.destinations]]\naction = "allow"\nto = ["127.0.0.0/8"]\n'
    )
    proc = ns.popen(
        [sys.executable, "-m", "socksd", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # imports; the load's failures would show a late start anyway
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--ports", type=int, default=1000, help="P: ephemeral ports in the range")
    ap.add_argument("--delay-ms", type=int, default=1000, help="H: tcp_tw_reuse_delay")
    ap.add_argument("--procs", type=int, default=2, help="load processes")
    ap.add_argument("--threads", type=int, default=24, help="threads per load process")
    args = ap.parse_args()
    limit = args.ports / (args.delay_ms / 1000.0)
    print(
        f"P = {args.ports} ports, H = {args.delay_ms} ms: kernel limit P/H = {limit:.0f}/s "
        f"per (egress IP, target); {args.seconds:.0f} s per run"
    )

    results = {}
    for mode in ("direct", "socks"):
        with NetNS("bench") as ns:
            _setup(ns, args.ports, args.delay_ms)
            _start_target(ns)
            if mode == "socks":
                tmp = Path(f"/tmp/socksd-bench-{ns.name}")
                tmp.mkdir(exist_ok=True)
                _socksd(ns, tmp)
                src = "127.0.1"
            else:
                src = EGRESS
            results[mode] = _load(ns, mode, args.seconds, args.procs, args.threads, src)

    base = _steady_median(results["direct"]["per_second"])
    ours = _steady_median(results["socks"]["per_second"])
    for name, key in (("baseline (no proxy, NO_PORT)", "direct"), ("socksd (1 worker)", "socks")):
        r = results[key]
        print(
            f"{name:30s} median {_steady_median(r['per_second']):8.0f} tunnels/s  "
            f"total {sum(r['per_second']):7d}  failures {r['failures'] or 0}"
        )
        print(f"{'':30s} per second: {r['per_second']}")
    print(
        f"socksd / baseline = {ours / base:.2f}   socksd / (P/H) = {ours / limit:.2f}   "
        f"baseline / (P/H) = {base / limit:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
