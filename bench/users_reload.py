"""Reload with many users: how long until they reach the workers, and what they cost.

    python bench/users_reload.py [--users 100000] [--rounds 5] [--workers 2]

Starts a real socksd (loopback, user/password, `auth.users_file`) with one user and a
tunnel that keeps moving bytes, then in each round rewrites the users file (renamed
over the old one, as a provisioning system does) with USERS users (one in ten with
per-user rules) and asks `socksd reload` on the control socket. Reported per round:
the time from the request to the outcome (the supervisor answers once every worker
applied the config: "reach the workers"), the supervisor's and each worker's share
(`reload_done` / `reload_applied`), whether the tunnel was cut, and the resident memory
of the supervisor and the workers with USERS users against one user (per user). In the
same run, the users file is also parsed with tomllib, the stdlib parser, for the choice
of rtoml. Medians and ranges over the rounds.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import orjson
import rtoml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from socksd.control import query  # noqa: E402
from socksd.passwords import hash_password  # noqa: E402


def users_file(n: int, hashed: str, salt: int) -> str:
    """n users; every tenth with an ingress rule and a tunnel limit. `salt` makes each
    round's file differ (a real change for every worker to apply)."""
    out = []
    for i in range(n):
        out.append(f'[users.u{i:06d}]\npassword = "{hashed}"\n')
        if i % 10 == 0:
            out.append(f'ingress = ["127.0.0.1"]\nmax_tunnels = {100 + salt}\n')
    return "".join(out)


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Echo:
    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        while data := conn.recv(65536):
            conn.sendall(data)


def tunnel(proxy: tuple[str, int], port: int, user: bytes, password: bytes) -> socket.socket:
    s = socket.create_connection(proxy, timeout=10)
    s.sendall(b"\x05\x01\x02")
    assert s.recv(2) == b"\x05\x02"
    s.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
    assert s.recv(2) == b"\x01\x00", "login refused"
    s.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"))
    reply = s.recv(10)
    assert reply[1] == 0, reply
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="socksd-users-"))
    hashed = hash_password("bench-password")
    path = tmp / "users.toml"
    write(path, f'[users.first]\npassword = "{hashed}"\n')
    control = str(tmp / "control.sock")
    config = tmp / "socksd.toml"
    config.write_text(
        f'listen = ["127.0.0.1:0"]\nworkers = {args.workers}\n'
        '[auth]\nmethod = "password"\nusers_file = "users.toml"\n'
        f'[control]\nsocket = "{control}"\n'
        '[[access.destinations]]\naction = "allow"\nto = ["127.0.0.1"]\n'
    )
    log = open(tmp / "socksd.log", "wb")  # noqa: SIM115 - kept for the run
    proc = subprocess.Popen(
        [sys.executable, "-m", "socksd", "--config", str(config)], stdout=log, cwd=REPO
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                stats = query(control)
                if all(w["alive"] for w in stats["workers"]) and stats["workers"]:
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() > deadline:
                raise SystemExit("socksd did not start")
            time.sleep(0.2)
        time.sleep(1.0)
        workers = [w["pid"] for w in stats["workers"] if w["alive"]]
        listen = [
            line
            for line in (tmp / "socksd.log").read_text().splitlines()
            if "supervisor_ready" in line
        ]
        host, _, port = orjson.loads(listen[0])["listen"][0].rpartition(":")
        proxy = (host, int(port))
        echo = Echo()
        s = tunnel(proxy, echo.port, b"first", b"bench-password")
        s.sendall(b"x" * 1000)
        got = 0
        while got < 1000:
            got += len(s.recv(65536))
        base = {pid: rss_kib(pid) for pid in [proc.pid, *workers]}

        rounds = []
        for r in range(args.rounds):
            text = users_file(args.users, hashed, r) + f'[users.first]\npassword = "{hashed}"\n'
            write(path, text)
            t0 = time.perf_counter()
            outcome = query(control, "reload", timeout=120)
            took = time.perf_counter() - t0
            assert outcome["ok"], outcome
            s.sendall(b"y" * 1000)  # the tunnel still moves bytes
            got = 0
            while got < 1000:
                chunk = s.recv(65536)
                assert chunk, "the tunnel was cut by the reload"
                got += len(chunk)
            t1 = time.perf_counter()
            tomllib.loads(text)
            t_toml = time.perf_counter() - t1
            t1 = time.perf_counter()
            rtoml.loads(text)
            t_rtoml = time.perf_counter() - t1
            rss = {pid: rss_kib(pid) for pid in base}
            rounds.append((took, outcome, t_toml, t_rtoml, rss))
            print(
                f"round {r + 1}: {args.users:,} users reached {outcome['workers_answered']} "
                f"workers in {took * 1000:.0f} ms (supervisor's reload_done "
                f"{outcome['duration_ms']} ms), revoked {outcome['revoked_total']}; parse: "
                f"tomllib {t_toml * 1000:.0f} ms, rtoml {t_rtoml * 1000:.0f} ms"
            )
        # A user from the big file logs in (scrypt, then the cache).
        tunnel(proxy, echo.port, b"u099999", b"bench-password").close()
        applied = [
            orjson.loads(line)
            for line in (tmp / "socksd.log").read_text().splitlines()
            if '"reload_applied"' in line
        ]

        def med(xs: list[float]) -> str:
            return f"{statistics.median(xs):.0f} [{min(xs):.0f}-{max(xs):.0f}]"

        print(
            f"\n{args.users:,} users, {args.workers} workers, {args.rounds} rounds "
            "(median [range]):"
        )
        print(
            f"  reload request -> every worker applied it: {med([r[0] * 1000 for r in rounds])} ms"
        )
        print(
            "  of which in a worker (reload_applied): "
            f"{med([a['duration_ms'] for a in applied])} ms"
        )
        print(
            f"  parse the users file: tomllib {med([r[2] * 1000 for r in rounds])} ms, "
            f"rtoml {med([r[3] * 1000 for r in rounds])} ms"
        )
        print("  the tunnel opened before the first reload moved bytes after each: yes")
        last = rounds[-1][4]
        for pid in base:
            role = "supervisor" if pid == proc.pid else f"worker {pid}"
            per_user = (last[pid] - base[pid]) * 1024 / args.users
            print(
                f"  {role}: RSS {base[pid]:,} KiB with 1 user, {last[pid]:,} KiB with "
                f"{args.users:,}: {per_user:.0f} bytes per user"
            )
        s.close()
    finally:
        proc.send_signal(signal.SIGQUIT)  # stop now: no drain of the bench's tunnel
        proc.wait(30)


if __name__ == "__main__":
    main()
