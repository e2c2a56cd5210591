"""HTTP forwarding benchmark: socksd's absolute-form GET path against tinyproxy.

    python bench/http_forward.py [--quick] [--rounds 6] [--requests 10000]
        [--connections 16] [--json out.json]

Root is needed (it creates network namespaces): run it as root with the dev venv's
`python` (it has socksd's dependencies). Needs dnsmasq (`apt-get install
dnsmasq-base`), tinyproxy (`apt-get install tinyproxy`; Debian's /usr/bin/tinyproxy)
and gcc. A full run (6 rounds of 4 columns of 10,000 requests) takes about 2 minutes
on 2 cores; `--quick` (1 round of 500 requests) under 10 s. Not part of the test suite.

What it measures: the HTTP proxy's *forwarding* path, the one a plain `http://` URL
takes: every request is `GET http://bench.test:PORT/ HTTP/1.1` (absolute form) with
`Proxy-Authorization: Basic` (user "bench"); the proxy authenticates it, resolves
bench.test through a real DNS server, connects to the origin, sends the request in
origin form and relays the 64-byte response. Four columns:
  socksd-keepalive     K client connections (--connections, default 16) each sending
                       its requests one after another (HTTP/1.1 keep-alive): socksd
                       answers each one and keeps the client connection, opening a new
                       upstream per request.
  socksd-close         every request on a new client connection, `Connection: close`
                       (K such connections in flight).
  tinyproxy-keepalive  the same two client behaviours against tinyproxy (C, threaded,
  tinyproxy-close      packaged by Debian), the HTTP proxy baseline.
A proxy that closes the client connection after a response although the client asked
for keep-alive (a `Connection: close` in the response, or an EOF / reset before any
byte of the next response on a reused connection) costs the client a reconnect, and
the request is sent again on a new connection: "reconn/req" says how many, so the
table shows whether keep-alive really happened (conns/req: client connections opened
per request; 1.00 is a connection per request).

Figures, per column the median over --rounds rounds (round 1: A, B, C, D; round 2:
A, B, C, D; ...):
  req/s          requests answered (200, Content-Length 64, the expected 64 bytes)
                 per second, from the client's first connect to its last response.
  CPU us/req     proxy CPU (user + sys, all its processes and threads) per request
                 answered; /proc counts in 10 ms ticks (over --quick's 500 requests
                 that is rough).
  DNS q/req      queries dnsmasq answered per request (glibc asks A and AAAA: 2.00
                 means every request cost a real lookup, as with tinyproxy). socksd
                 keeps a per-worker cache of DNS answers for their TTL (300 s here):
                 after its warm-up it reads 0.00, as it would for a customer's steady
                 traffic to one host.
  CPU L/P/O %    load side (client + origin + dnsmasq), proxy, rest of the machine,
                 in % of one core over the measurement (the client's start-up is
                 outside it); L near 100 means the load core, not the proxy, set the
                 pace: then req/s understates the proxy, CPU us/req does not.
  failures       requests that got no valid answer, by kind (connect:<errno>,
                 status:<code>, eof:<stage>, reset:<stage>, timeout:<stage>, body,
                 extra_bytes, ...), totals over all rounds: a run with failures is
                 flagged, never silently counted (req/s counts valid answers only).
Then the median and [min-max] of the per-round ratios socksd-keepalive/socksd-close,
socksd-keepalive/tinyproxy-keepalive and socksd-close/tinyproxy-close, for req/s and
for CPU us/req (a ratio from the same round: steadier than the ratio of medians).

Setup: every column of every round runs in a network namespace of its own, created
for it and removed after it (so no TIME_WAIT of one column slows the next), with
bench/perf.py's sysctls (`tcp_tw_reuse`, the full port range, ...), its dnsmasq on
127.0.0.53 (no cache, no upstream; bench.test has a host record for 127.0.0.1) and
`bench/http_origin.c` (compiled with `gcc -O2` into a temp dir at start): a
single-threaded epoll HTTP/1.1 origin on 127.0.0.1 answering every GET with
`200 OK` and 64 bytes. The client is this script in client mode: one Python process,
non-blocking sockets and `selectors`, prebuilt request bytes, minimal parsing, source
addresses 127.0.1.1-16. With >= 2 CPUs the proxy is pinned to core 0 and the client,
the origin and dnsmasq to the last core (bench/perf.py's plan). socksd runs with 1
worker, `protocols = ["socks5", "http"]`, `[auth] method = "password"` with the one
user, log level info (a `tunnel_closed` line per request), the destination rule that
allows 127.0.0.0/8, from a copy of socksd/ and workers/ taken at start; tinyproxy with
BasicAuth for the same user and password, `LogLevel Critical`. Each proxy is started
fresh for each column of each round and gets 200 warm-up requests first (which fill
socksd's cache of verified passwords, as steady traffic does).
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import os
import platform
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import perf  # noqa: E402 - bench/perf.py: namespaces, dnsmasq, proxies, CPU accounting

HOST, PROXY_PORT = perf.HOST, perf.PROXY_PORT
ORIGIN_PORT = 603  # below the ephemeral range, like perf.py's target ports
ORIGIN_LIFETIME_S = 1800  # the origin exits by itself after this, whatever happens
BODY = b"0123456789abcdef" * 4  # what bench/http_origin.c sends: 64 bytes
WARMUP = 200  # requests before each measurement
REQUEST_TIMEOUT_S = 10.0
HEAD_MAX = 16384  # a response head longer than this is a failure
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: the port is picked at connect(), per 4-tuple
MODES = ("keepalive", "close")
RATIOS = (
    ("socksd-keepalive", "socksd-close"),
    ("socksd-keepalive", "tinyproxy-keepalive"),
    ("socksd-close", "tinyproxy-close"),
)


@dataclass(frozen=True, slots=True)
class Column:
    key: str  # "socksd-keepalive", ...
    proxy: perf.Column  # how the proxy is started (a fresh one per round)
    mode: str  # "keepalive" or "close": what the client does


@dataclass(slots=True)
class Sample:
    """One column in one round."""

    ok: int = 0
    requests: int = 0
    elapsed_s: float = 0.0
    load_s: float = 0.0
    proxy_s: float = 0.0
    other_s: float = 0.0
    connections: int = 0
    reconnects: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    dns_queries: int | None = None

    @property
    def req_s(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def cpu_us(self) -> float | None:
        return self.proxy_s / self.ok * 1e6 if self.ok else None

    def pct(self, cpu_s: float) -> float:
        return 100.0 * cpu_s / self.elapsed_s if self.elapsed_s > 0 else 0.0


# -- the client (runs in the namespace, pinned to the load core) ------------------------


def request_bytes(mode: str) -> bytes:
    """The one request every connection sends, built once."""
    authority = f"{perf.TARGET_NAME}:{ORIGIN_PORT}"
    credentials = base64.b64encode(f"{perf.USER}:{perf.PASSWORD}".encode()).decode()
    head = (
        f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n"
        f"Proxy-Authorization: Basic {credentials}\r\n"
    )
    if mode == "close":
        head += "Connection: close\r\n"
    return (head + "\r\n").encode()


class _Conn:
    __slots__ = ("sock", "buf", "reused", "retried", "started", "connecting")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.reused = False  # a response was read on it: the proxy may have closed it
        self.retried = False  # its request is a resend after a stale keep-alive
        self.started = time.monotonic()
        self.connecting = True


def run_client(cfg: dict[str, Any]) -> dict[str, Any]:
    """`requests` requests over `connections` connections at a time; the result as JSON.

    keep-alive: each connection sends its next request once the answer to the last is
    read; close: one request per connection. Every answer must be 200 with BODY.
    """
    mode, total = cfg["mode"], cfg["requests"]
    keepalive = mode == "keepalive"
    request = request_bytes(mode)
    proxy = (cfg["proxy_host"], cfg["proxy_port"])
    sources = cfg["sources"]
    deadline = time.monotonic() + cfg["deadline_s"]
    sel = selectors.DefaultSelector()
    failures: dict[str, int] = {}
    reconnects: dict[str, int] = {}
    ok = done = connections = 0
    todo = total  # requests not yet given to a connection
    live: set[_Conn] = set()
    # Connections to open next (True: to resend a request a stale connection lost),
    # opened by the main loop: a failing connect never recurses into the next one.
    opens = [False] * min(cfg["connections"], total)

    def fail(kind: str) -> None:
        nonlocal done
        failures[kind] = failures.get(kind, 0) + 1
        done += 1

    def drop(conn: _Conn) -> None:
        live.discard(conn)
        sel.unregister(conn.sock)
        conn.sock.close()

    def send(conn: _Conn) -> bool:
        """Send the request; False when the connection turned out closed or failed."""
        try:
            sent = conn.sock.send(request)
        except BlockingIOError:
            return True  # still connecting (the caller waits for EVENT_WRITE)
        except OSError as exc:
            if conn.connecting:
                fail(f"connect:{errno.errorcode.get(exc.errno or 0, exc.errno)}")
            elif conn.reused and not conn.retried:
                return stale(conn, "send")
            else:
                fail(f"send:{errno.errorcode.get(exc.errno or 0, exc.errno)}")
            drop(conn)
            opens.append(False)
            return False
        if conn.connecting:
            conn.connecting = False
            sel.modify(conn.sock, selectors.EVENT_READ, conn)
        if sent != len(request):
            fail("short_send")
            drop(conn)
            opens.append(False)
            return False
        conn.started = time.monotonic()
        return True

    def stale(conn: _Conn, how: str) -> bool:
        """A kept-alive connection the proxy had closed: resend on a new one."""
        reconnects[f"stale_{how}"] = reconnects.get(f"stale_{how}", 0) + 1
        drop(conn)
        opens.append(True)
        return False

    def open_conn(retry: bool = False) -> None:
        """A new connection for the next request (or the one a stale connection lost)."""
        nonlocal todo, connections
        if not retry:
            if todo == 0:
                return
            todo -= 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((sources[connections % len(sources)], 0))
        connections += 1
        conn = _Conn(sock)
        conn.retried = retry
        err = sock.connect_ex(proxy)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            fail(f"connect:{errno.errorcode.get(err, err)}")
            opens.append(False)
            return
        live.add(conn)
        # On loopback the handshake is usually over once connect() returns: try at once.
        sel.register(sock, selectors.EVENT_WRITE, conn)
        send(conn)

    def answered(conn: _Conn, closes: bool) -> None:
        """A complete response was read: the next request, here or on a new connection."""
        nonlocal todo
        conn.buf = b""
        if not keepalive or closes or todo == 0:
            if keepalive and closes and todo:
                reconnects["closed_by_header"] = reconnects.get("closed_by_header", 0) + 1
            drop(conn)
            opens.append(False)
            return
        todo -= 1
        conn.reused, conn.retried = True, False
        send(conn)

    def readable(conn: _Conn) -> None:
        nonlocal ok, done
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            data, why = b"", f"reset:{errno.errorcode.get(exc.errno or 0, exc.errno)}"
        else:
            why = "eof"
        if not data:
            if not conn.buf and conn.reused and not conn.retried:
                stale(conn, why.partition(":")[0])
                return
            stage = "body" if b"\r\n\r\n" in conn.buf else "head"
            fail(f"{why}:{stage}")
            drop(conn)
            opens.append(False)
            return
        buf = conn.buf = conn.buf + data
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            if len(buf) > HEAD_MAX:
                fail("head_too_large")
                drop(conn)
                opens.append(False)
            return
        if buf[:5] != b"HTTP/" or buf[9:12] != b"200":
            fail(f"status:{buf[9:12].decode(errors='replace')}")
            drop(conn)
            opens.append(False)
            return
        head = buf[:head_end].lower()
        at = head.find(b"\r\ncontent-length:")
        eol = head.find(b"\r\n", at + 2)
        try:
            length = int(head[at + 17 : eol if eol >= 0 else len(head)]) if at >= 0 else -1
        except ValueError:
            length = -1
        need = head_end + 4 + length
        if length < 0:
            kind = "content_length"
        elif len(buf) < need:
            return
        elif len(buf) > need:
            kind = "extra_bytes"
        elif buf[head_end + 4 :] != BODY:
            kind = "body"
        else:
            ok += 1
            done += 1
            answered(conn, b"\r\nconnection: close" in head)
            return
        fail(kind)
        drop(conn)
        opens.append(False)

    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    last_sweep = t0
    while done < total:
        while opens:
            open_conn(opens.pop())
        if done >= total:
            break
        for key, _events in sel.select(1.0):
            conn = key.data
            if conn.connecting:
                send(conn)  # connected (or failed: send() tells)
            else:
                readable(conn)
        now = time.monotonic()
        if now - last_sweep >= 1.0:  # timeouts, once a second
            last_sweep = now
            if now > deadline:
                break
            for conn in [c for c in live if now - c.started > REQUEST_TIMEOUT_S]:
                stage = "connect" if conn.connecting else "body" if conn.buf else "head"
                fail(f"timeout:{stage}")
                drop(conn)
                opens.append(False)
    elapsed = time.monotonic() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    if done < total:
        failures["deadline"] = total - done
    for conn in list(live):
        drop(conn)
    return {
        "ok": ok,
        "requests": total,
        "elapsed_s": elapsed,
        "cpu_s": (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime),
        "connections": connections,
        "reconnects": reconnects,
        "failures": failures,
    }


# -- the world of one column in one round: namespace, origin, dnsmasq, proxy ------------


class World(perf.Bench):
    """perf.py's Bench with the HTTP origin instead of its echo and bulk targets.

    Reuses its dnsmasq set-up (`_start_dns`, `dns_queries`, `close`), its proxy start
    and readiness checks (`start`) and `wait_quiet`; none of its load methods.
    """

    def __init__(self, ns: perf.NetNS, tmp: Path, load_cpus: str | None) -> None:
        # Not Bench.__init__: that starts bench/target.c, which is not used here.
        self.ns, self.tmp = ns, tmp
        self.pin_load = ["taskset", "-c", load_cpus] if load_cpus else []
        self._etc: Path | None = None
        self._dns: tuple[int, Path] | None = None
        for key, value in perf.SYSCTLS.items():
            ns.sysctl(key, value)
        argv = [str(tmp / "http_origin"), HOST, str(ORIGIN_PORT), str(ORIGIN_LIFETIME_S)]
        self.world_pids = [self.start_ready(argv, "http_origin"), self._start_dns()]

    def client(
        self, proxy: perf.RunningProxy, mode: str, requests: int, connections: int
    ) -> tuple[dict[str, Any], perf.Cpu]:
        """Run the client in the namespace, pinned to the load core: its JSON result
        and the CPU each side used from its first connect to its last response."""
        deadline_s = 30 + requests / 100
        cfg = {
            "mode": mode,
            "requests": requests,
            "connections": connections,
            "proxy_host": HOST,
            "proxy_port": PROXY_PORT,
            "sources": [f"127.0.1.{i}" for i in range(1, perf.CLIENT_SRC_COUNT + 1)],
            "deadline_s": deadline_s,
        }
        argv = [*self.pin_load, sys.executable, str(Path(__file__).resolve())]
        proc = self.ns.popen(
            [*argv, "--client", json.dumps(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert proc.stdin is not None and proc.stdout is not None
        # The meter starts once the client has started (Python, imports, `ip netns
        # exec`): its start-up is in no figure, as it is in no request.
        if perf._read_line(proc.stdout, 30.0) != "ready":
            proc.kill()
            proc.communicate(timeout=30)
            raise RuntimeError("client did not start")
        meter = perf.CpuMeter(proxy.pids(), self.world_pids)
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=deadline_s + 30)
        lines = out.decode().strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"client exited {proc.returncode}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result, meter.read(result["cpu_s"])


def run_column(world: World, col: Column, tag: str, args: argparse.Namespace) -> Sample:
    proxy = world.start(col.proxy, tag)
    try:
        warm, _ = world.client(proxy, col.mode, WARMUP, args.connections)
        if warm["ok"] == 0:
            # A wrong password or a proxy that refuses: a row of failures, not a dead run.
            failures = {f"warmup_{k}": v for k, v in warm["failures"].items()}
            return Sample(requests=args.requests, failures=failures)
        world.wait_quiet(proxy)
        q0 = world.dns_queries()
        r, cpu = world.client(proxy, col.mode, args.requests, args.connections)
        q1 = world.dns_queries()
    finally:
        proxy.stop()
    return Sample(
        ok=r["ok"],
        requests=r["requests"],
        elapsed_s=r["elapsed_s"],
        load_s=cpu.load_s,
        proxy_s=cpu.proxy_s,
        other_s=cpu.other_s,
        connections=r["connections"],
        reconnects=r["reconnects"],
        failures=r["failures"],
        dns_queries=q1 - q0 if q0 is not None and q1 is not None else None,
    )


def measure(
    tmp: Path, columns: list[Column], args: argparse.Namespace, load_cpus: str | None
) -> dict[str, list[Sample]]:
    """Every round, the columns interleaved; each column in a namespace of its own."""
    runs: dict[str, list[Sample]] = {c.key: [] for c in columns}
    for rnd in range(1, args.rounds + 1):
        for col in columns:
            t0 = time.monotonic()
            with perf.NetNS("httpfwd") as ns:
                world = World(ns, tmp, load_cpus)
                try:
                    try:
                        s = run_column(world, col, f"r{rnd}", args)
                    except RuntimeError as exc:
                        print(f"round {rnd} {col.key}: {exc}")
                        s = Sample(requests=args.requests, failures={"run_error": 1})
                finally:
                    world.close()
            runs[col.key].append(s)
            print(
                f"round {rnd}/{args.rounds} {col.key:20} {s.req_s:9,.0f} req/s  "
                f"{_fmt(s.cpu_us, '.1f')} us/req  conns {s.connections:,}  "
                f"reconnects {_kinds(s.reconnects)}  failures {_kinds(s.failures)}  "
                f"(CPU L{s.pct(s.load_s):.0f} P{s.pct(s.proxy_s):.0f} "
                f"O{s.pct(s.other_s):.0f})  ({time.monotonic() - t0:.1f} s)",
                flush=True,
            )
    return runs


# -- report -----------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _kinds(counts: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(counts.items())) if counts else "0"


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def summarize(runs: dict[str, list[Sample]]) -> dict[str, dict[str, Any]]:
    summary = {}
    for key, samples in runs.items():
        total_ok = sum(s.ok for s in samples)
        failures: dict[str, int] = {}
        reconnects: dict[str, int] = {}
        for s in samples:
            for kind, n in s.failures.items():
                failures[kind] = failures.get(kind, 0) + n
            for kind, n in s.reconnects.items():
                reconnects[kind] = reconnects.get(kind, 0) + n
        dns = [
            s.dns_queries / s.ok if s.dns_queries is not None and s.ok else None for s in samples
        ]
        summary[key] = {
            "req_s": _median([s.req_s for s in samples]),
            "cpu_us_per_req": _median([s.cpu_us for s in samples]),
            "conns_per_req": _median([s.connections / s.ok if s.ok else None for s in samples]),
            "reconnects_per_req": sum(reconnects.values()) / total_ok if total_ok else None,
            "dns_queries_per_req": _median(dns),
            "load_pct": _median([s.pct(s.load_s) for s in samples]),
            "proxy_pct": _median([s.pct(s.proxy_s) for s in samples]),
            "other_pct": _median([s.pct(s.other_s) for s in samples]),
            "ok": total_ok,
            "requests": sum(s.requests for s in samples),
            "reconnects": reconnects,
            "failures": failures,
        }
    return summary


def round_ratios(runs: dict[str, list[Sample]]) -> dict[str, dict[str, Any]]:
    """Per pair of RATIOS: the per-round ratios of req/s and of CPU us/req."""
    out = {}
    for a, b in RATIOS:
        if a not in runs or b not in runs:
            continue
        rates, cpus = [], []
        for sa, sb in zip(runs[a], runs[b], strict=True):
            rates.append(sa.req_s / sb.req_s if sb.req_s else None)
            ca, cb = sa.cpu_us, sb.cpu_us
            cpus.append(ca / cb if ca is not None and cb else None)
        out[f"{a}/{b}"] = {"req_s": rates, "cpu_us_per_req": cpus}
    return out


def _range(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "-"
    return f"{statistics.median(got):.3f} [{min(got):.3f}-{max(got):.3f}]"


def print_report(
    columns: list[Column], summary: dict[str, dict[str, Any]], ratios: dict[str, Any]
) -> None:
    print()
    print(
        f"{'column':20} {'req/s':>9} {'CPU us/req':>10} {'conns/req':>9} {'reconn/req':>10} "
        f"{'DNS q/req':>9} {'CPU L/P/O %':>12}  failures"
    )
    for col in columns:
        m = summary[col.key]
        cpu = f"{m['load_pct']:.0f}/{m['proxy_pct']:.0f}/{m['other_pct']:.0f}"
        print(
            f"{col.key:20} {_fmt(m['req_s'], ',.0f'):>9} {_fmt(m['cpu_us_per_req'], '.1f'):>10} "
            f"{_fmt(m['conns_per_req'], '.3f'):>9} {_fmt(m['reconnects_per_req'], '.3f'):>10} "
            f"{_fmt(m['dns_queries_per_req'], '.2f'):>9} {cpu:>12}  {_kinds(m['failures'])}"
        )
    for col in columns:
        m = summary[col.key]
        if m["reconnects"]:
            print(f"{col.key}: reconnects by kind (all rounds): {_kinds(m['reconnects'])}")
        if m["failures"]:
            failed = sum(m["failures"].values())
            print(
                f"WARNING {col.key}: {failed:,} of {m['requests']:,} requests failed "
                f"({_kinds(m['failures'])}); req/s counts valid answers only"
            )
    print()
    print("per-round ratios, median [min-max]:")
    for name, r in ratios.items():
        print(f"  {name:42} req/s {_range(r['req_s'])}  CPU us/req {_range(r['cpu_us_per_req'])}")


def versions(digest: str) -> dict[str, str]:
    repo = str(perf.REPO)
    commit = perf._version(["git", "-C", repo, "rev-parse", "--short", "HEAD"])
    dirty = perf._version(["git", "-C", repo, "status", "--porcelain", "socksd", "workers"])
    changes = " + uncommitted changes" if dirty not in ("", "?") else ""
    return {
        "socksd": f"{commit}{changes}, snapshot {digest}",
        "python": platform.python_version(),
        "tinyproxy": perf._version(["tinyproxy", "-v"]),
        "tinyproxy_deb": perf._version(["dpkg-query", "-W", "-f", "${Version}", "tinyproxy"]),
        "dnsmasq": perf._version(["dnsmasq", "--version"]),
        "kernel": platform.release(),
        "cpus": str(len(os.sched_getaffinity(0))),
    }


# -- set-up -----------------------------------------------------------------------------


def build_origin(tmp: Path) -> None:
    src = BENCH / "http_origin.c"
    out = subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(tmp / "http_origin"), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode != 0:
        sys.exit(f"http_forward: gcc failed on {src}:\n{out.stderr}")


def tinyproxy_config(tmp: Path) -> Path:
    """perf.py's tinyproxy set-up for the forwarding path: BasicAuth for the bench's
    user; no ConnectPort line (it restricts CONNECT only, a plain GET may go to any
    port, the origin's included); no log line per request."""
    config = tmp / "tinyproxy-http-forward.conf"
    config.write_text(
        f"Port {PROXY_PORT}\nListen {HOST}\nTimeout 60\nMaxClients 2000\n"
        f"LogLevel Critical\nAllow 127.0.0.0/8\nBasicAuth {perf.USER} {perf.PASSWORD}\n"
    )
    return config


def make_columns(
    tmp: Path, python: str, proxy_cpus: dict[int, str | None]
) -> tuple[list[Column], list[str]]:
    hashed = perf.user_hash(python, tmp / "src")  # the snapshot's `socksd passwd`
    config = perf.socksd_config(
        tmp, "http-forward", 1, hashed, top='protocols = ["socks5", "http"]\n'
    )
    socksd = perf.Column(
        "socksd", "socksd", (python, "-m", "socksd", "--config", str(config)), proxy_cpus[1]
    )
    proxies = [socksd]
    notes = []
    tinyproxy = shutil.which("tinyproxy")
    if tinyproxy:
        argv = (tinyproxy, "-d", "-c", str(tinyproxy_config(tmp)))
        proxies.append(perf.Column("tinyproxy", "tinyproxy", argv, proxy_cpus[0]))
    else:
        notes.append("tinyproxy not installed (apt-get install tinyproxy): skipped")
    columns = [Column(f"{p.key}-{mode}", p, mode) for p in proxies for mode in MODES]
    return columns, notes


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds of the 4 columns (6)")
    ap.add_argument("--requests", type=int, default=10000, help="requests per run (10000)")
    ap.add_argument("--connections", type=int, default=16, help="client connections in flight (16)")
    ap.add_argument("--json", help="write the figures and every round's samples here")
    ap.add_argument("--quick", action="store_true", help="1 round of 500 requests")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.requests = 1, 500
    if args.rounds < 1 or args.requests < 1 or args.connections < 1:
        ap.error("--rounds, --requests and --connections must be positive")
    return args


def preflight() -> None:
    if os.geteuid() != 0:
        sys.exit("http_forward: run as root (it creates network namespaces)")
    for tool in ("gcc", "dnsmasq", "taskset", "ip"):
        if not shutil.which(tool):
            sys.exit(f"http_forward: {tool} is not installed")
    check = subprocess.run(
        [sys.executable, "-c", "import orjson, structlog, setproctitle, h11"],
        capture_output=True,
        timeout=30,
    )
    if check.returncode != 0:
        sys.exit(f"http_forward: {sys.executable} lacks socksd's dependencies; use the venv's")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--client":
        cfg = json.loads(sys.argv[2])
        print("ready", flush=True)
        sys.stdin.readline()  # "go": the parent's CPU meter has started
        print(json.dumps(run_client(cfg)))
        return 0
    args = parse_args()
    preflight()
    load_cpus, proxy_cpus, notes = perf.plan_cpus((1,))
    tmp = Path(tempfile.mkdtemp(prefix="socksd-httpfwd-"))
    started = time.monotonic()
    try:
        build_origin(tmp)
        digest = perf.snapshot_socksd(tmp)
        columns, more = make_columns(tmp, sys.executable, proxy_cpus)
        notes += more
        env = versions(digest)
        settings = {
            "rounds": args.rounds,
            "requests": args.requests,
            "connections": args.connections,
            "warmup": WARMUP,
            "origin_port": ORIGIN_PORT,
            "target_name": perf.TARGET_NAME,
        }
        print("socksd http_forward:", json.dumps(env))
        print("settings:", json.dumps(settings))
        for note in notes:
            print(f"note: {note}")
        sys.stdout.flush()
        runs = measure(tmp, columns, args, load_cpus)
        summary = summarize(runs)
        ratios = round_ratios(runs)
        print_report(columns, summary, ratios)
        elapsed = time.monotonic() - started
        print(f"total time {elapsed:.0f} s")
        if args.json:
            report = {
                "versions": env,
                "settings": settings,
                "sysctls": perf.SYSCTLS,
                "notes": notes,
                "summary": summary,
                "round_ratios": ratios,
                "runs": {k: [asdict(s) for s in v] for k, v in runs.items()},
                "elapsed_s": elapsed,
            }
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
