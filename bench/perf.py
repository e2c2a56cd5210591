"""Performance benchmark: socksd against microsocks, pproxy and no proxy, per core.

    python bench/perf.py [--runs 3] [--quick] [--workers 1,2] [--json out.json]
        [--floor] [--splice-relay] [--against REV ...] [--only rate,rss,bulk,udp,sustained]
        [--baselines microsocks,pproxy,noproxy|none] [--namespaces shared|per-column]
        [--paths auth-name,auth-ip,noauth-name,noauth-ip|all] [--tunnels N]
        [--target-name NAME] [--password PASS]

    A/B of the per-customer accounting (on, the default, against off):
    python bench/perf.py --workers 1 --paths auth-name,noauth-ip --only rate \
        --baselines microsocks --accounting-off --namespaces per-column --runs 10

    A/B of two revisions' tunnel rate (a few minutes: 10 rounds of 20,000 tunnels each):
    python bench/perf.py --workers 1 --against REV --only rate --baselines none \
        --namespaces per-column --runs 10

    The customer's path (user/password + hostname) as the headline, next to the others:
    python bench/perf.py --workers 1 --paths all --only rate --baselines microsocks \
        --namespaces per-column --runs 10

Root is needed (it creates network namespaces): run it as root with the dev venv's
`python` (it has socksd's dependencies; `sudo python` may pick the system one).
Baselines are the bench's own install step: `apt-get install microsocks` and
`pip install pproxy` (into that venv), `apt-get install dnsmasq-base` for the hostname
paths; a baseline that is missing is skipped with a note. A full run takes about
3 minutes on 2 cores; `--quick` (2,000 tunnels, 64 MiB, 1,000 idle tunnels, 1 run,
6,000 sustained tunnels) about 25 s. Not part of the test suite.

Setup: everything runs in a throw-away network namespace on its loopback, with
`tcp_tw_reuse = 1`, `tcp_timestamps = 1`, `ip_local_port_range = 1024 65535` and
`tcp_max_tw_buckets` raised so that no TIME_WAIT is skipped. Clients bind 16 source
addresses 127.0.1.1-16 (IP_BIND_ADDRESS_NO_PORT), so the client side never runs out of
ports. The load generators (`bench/loadgen.c`, `bench/udpload.c`) and the targets
(`bench/target.c`: TCP and UDP echo, bulk sender) are C programs, compiled with
`gcc -O2` into a temp dir at start.
Each proxy listens on 127.0.0.1 and reaches the targets on 127.0.0.1; it is started
fresh for every run of every column (columns interleaved within a run); the sustained
run gets a fresh namespace of its own. With >= 2 CPUs the proxy (all its processes and
threads) is pinned to core 0 and the load generator and targets to the last core; socksd
with `workers = N` gets cores 0..N-1, or every core when N is not below the CPU count,
in which case the load shares a core with it (the output says so).
socksd runs with a generated config: `workers = N`, log level info (one `tunnel_closed`
line per tunnel stays on), its stdout going to a log file on disk; it runs from a copy of
socksd/ and workers/ taken at start, so edits made meanwhile do not mix into the figures.

Figures: medians of --runs runs (failures are totals over all runs):
  tunnels/s      tunnels completed per second: connect, SOCKS5 no-auth greeting, CONNECT
                 to the echo target (ATYP IPv4; other handshakes: --paths), reply,
                 send 64 bytes, read the 64-byte echo, close; 20,000 tunnels with 64
                 in flight ("no proxy": connect straight to the echo target, send 64,
                 read 64, close).
  tunnels/proxy CPU-s  tunnels completed per second of CPU (user + sys) the proxy used
                 meanwhile: the per-core efficiency. With N workers it should stay near
                 the 1-worker figure (near-linear scaling) even on a machine where the
                 load has to share the workers' cores, as it does here with 2 cores.
  TTFB p50/p99   milliseconds from the start of connect() to the first echo byte.
  MiB/s 1 / 8    the client downloads 1 GiB in total through the proxy, in 1 stream or
                 in 8 concurrent streams of 128 MiB (sender: sendfile() from a memfd;
                 client: recv(MSG_TRUNC), so neither end copies the bytes).
  RSS/idle       KiB of proxy RSS (sum of VmRSS over all its processes) per tunnel held
                 open and idle after the handshake: (RSS holding N - RSS before) / N.
                 N = 10,000, or less when a single process cannot hold 2 fds per tunnel
                 under RLIMIT_NOFILE's hard limit (the output prints N).
  UDP echo       datagrams per second echoed through one UDP ASSOCIATE (64-byte
                 payloads, 32 in flight, 100,000 per run; bench/udpload.c against the
                 target's UDP echo on the echo port); a datagram not back within 200 ms
                 counts as lost (failures: udp_lost). socksd and no proxy only.
  failures       failed tunnels over every measurement of every run, by kind:
                 connect:<errno>, reply:<code>, timeout:<stage>, short_read:<stage>, ...
  CPU            for every figure, the CPU (user + sys) of the load side (load
                 generator + targets) and of the proxy side (all its processes), as a
                 percentage of one core over the measurement: ~100 % marks the side that
                 saturated its core (>= 90 % on the load side is flagged), and of the
                 rest of the machine (O: other processes, ksoftirqd, VM steal; >= 25 %
                 is flagged as disturbed, e.g. a test suite running). On loopback the
                 receive path of a segment runs on the sender's core, so each side also
                 pays for part of the other's TCP work. /proc counts in 10 ms ticks:
                 precise over the full run's seconds, rough over --quick's milliseconds.
                 "No proxy" runs client and targets on the load core alone, so its
                 figures are bounded by one core while a proxied run uses two.
  sustained      60,000 tunnels back to back through socksd to one target from one
                 ingress IP (so from one egress IP): failures must be 0.
--floor adds `bench/floor.py` (tunnels/s and TTFB only): the least Python a SOCKS5
CONNECT tunnel can cost with socksd's syscalls and nothing else, so the distance from
socksd to it is the price of socksd's structure, not of Python.
--splice-relay adds `bench/splice_relay.c` (MiB/s only): a C relay with a thread per
direction and blocking splice() through a 256 KiB pipe, no event loop and no Python.
It is the ceiling of the splice method on the machine, read next to "no proxy": on
loopback a relayed stream pays for a second TCP connection that a direct one does not.
--against REV (repeatable) adds a column "socksd@REV": socksd/ and workers/ of git
revision REV (`git archive`), started with the same Python and config as the first
--workers column, interleaved with the other columns in every run (A, B, A, B, ...).
--only keeps some figures (rate = tunnels/s, TTFB and proxy CPU per tunnel; the
sustained run is a figure too), --baselines picks the baseline columns ("none": only
socksd and its revisions).
--paths picks how each tunnel is opened, each path a row of its own (default
noauth-ip, the only path before these existed; the first listed is the headline):
  auth-name    user/password + hostname, the customer's path: method 0x02, RFC 1929
               sub-negotiation (user "bench"), CONNECT with ATYP 0x03 "bench.test"
  auth-ip      user/password + IPv4 literal
  noauth-name  no auth + hostname
  noauth-ip    no auth + IPv4 literal (every other figure is measured on this path)
On the auth paths socksd runs with `auth.method = "password"` and the one user (its
hash from `socksd passwd`; the warm-up fills socksd's per-worker cache of verified
passwords, as a customer's steady traffic does) and microsocks with `-u -P`; pproxy
runs on the no-auth paths only, "no proxy" on noauth-ip only. On the hostname paths
the proxies resolve through dnsmasq, which the bench starts in each namespace on its
loopback (127.0.0.53:53) with no cache, no /etc/hosts, no upstream, and a host
record for bench.test (TTL 300; any other name under .test is NXDOMAIN); the
namespace's /etc/resolv.conf points at it (/etc/netns/NAME/resolv.conf, which `ip
netns exec` mounts over it, removed at the end), so each lookup is a real DNS query
(glibc sends A and AAAA: "DNS queries/tunnel", counted from dnsmasq's own counters,
should read 2.00). dnsmasq is pinned to the load core and counted on the load side.
The paths table gives per path and proxy: median tunnels/s, proxy CPU per tunnel,
TTFB p99, failures, DNS queries per tunnel, the median [range] of the per-round ratio
to socksd on the same path, and of the ratio to the same proxy on noauth-ip (the
price of the handshake). --password (what clients send) and --target-name (what they
ask for) exist to check that a wrong password or an NXDOMAIN shows up as failures
(auth:<status>, reply:<code>, timeout:auth, ...) rather than as a silent zero; a column
whose warm-up gets no tunnel through is reported with tunnels/s 0 and its failures.
Per-run ratios: socksd / baseline within each run (measured minutes apart), median and
range; steadier than the ratio of medians when the host drifts during a run.
Per round (with the rate figure): every column's tunnels/s, proxy CPU (user + sys) per
tunnel in us, failures, the TIME_WAIT sockets the columns before it left in the
namespace, and its ratio to the first column of its path (socksd, working tree) in
that round; then the median of those ratios and their range. That is the figure for "no regression"
between two revisions: CPU per tunnel is what a refactoring changes, tunnels/s also
moves with the load side. /proc counts CPU in 10 ms ticks: over 20,000 tunnels
(~2.5 s of proxy CPU) that is 0.4 %, over 2,000 it is 4 %. The first column of round
1 starts in a fresh namespace while every later one follows another column's TIME_WAIT
sockets: hence a median over several rounds, never one round. --namespaces per-column
gives every column a namespace (and targets) of its own for the whole run, so each
starts among its own TIME_WAIT sockets from its previous round only: the same for A
and B, where a shared namespace makes each follow the other's.
Ratios are socksd (the first --workers value) / baseline: above 1 is better for
tunnels/s and MiB/s; below 1 is better for TTFB and RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.netns import NetNS  # noqa: E402 - the bench reuses the tests' namespace helper

HOST = "127.0.0.1"
ECHO_PORT, BULK_PORT = 601, 602  # below the ephemeral range, so never an autobind port
PROXY_PORT = 700
CLIENT_SRC, CLIENT_SRC_COUNT = "127.0.1.1", 16
FD_MARGIN = 1000  # fds a proxy process may need besides 2 per held tunnel
TARGET_LIFETIME_S = 3600  # the target exits by itself after this, whatever happens
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOAD_BOUND_PCT = 90  # load-side CPU at which a figure is flagged as possibly load-bound
DISTURBED_PCT = 25  # CPU of the rest of the machine at which a figure is flagged
# --only: tunnels/s (+TTFB, proxy CPU per tunnel), RSS per idle tunnel, MiB/s 1 and 8
# streams, UDP echo, the sustained run.
FIGURES = ("rate", "rss", "bulk", "udp", "sustained")
BASELINES = ("microsocks", "pproxy", "noproxy", "tinyproxy")  # --baselines


@dataclass(frozen=True, slots=True)
class TunnelPath:
    """One way a client opens a tunnel: with or without RFC 1929, to an IP or a name."""

    key: str
    label: str
    auth: bool  # RFC 1929 user/password (method 0x02) before the request
    name: bool  # CONNECT to a hostname (ATYP 0x03) the proxy resolves through DNS
    http: bool = False  # an HTTP proxy's CONNECT (Basic credentials) instead of SOCKS5


# The customer's path first: customers always authenticate and mostly send hostnames.
PATHS = {
    p.key: p
    for p in (
        TunnelPath("auth-name", "user/password + hostname", auth=True, name=True),
        TunnelPath("auth-ip", "user/password + IPv4", auth=True, name=False),
        TunnelPath("noauth-name", "no auth + hostname", auth=False, name=True),
        TunnelPath("noauth-ip", "no auth + IPv4", auth=False, name=False),
        # The same tunnel through the HTTP front door on the same port (issue 17).
        TunnelPath(
            "http-auth-name", "HTTP CONNECT, user/password + hostname", True, True, http=True
        ),
    )
}
DEFAULT_PATH = "noauth-ip"  # the bench's path before the others existed
USER, PASSWORD = "bench", "bench-password"  # the one user of socksd and microsocks
TARGET_NAME = "bench.test"  # dnsmasq answers it with HOST
DNS_ADDR = "127.0.0.53"  # dnsmasq in the bench's namespace, on its loopback
DNS_TTL = 300
SYSCTLS = {
    "net.ipv4.tcp_tw_reuse": "1",
    "net.ipv4.tcp_timestamps": "1",
    "net.ipv4.ip_local_port_range": "1024 65535",
    # Above the 131072 default: past it the kernel silently skips TIME_WAIT, which would
    # hide exactly the port pressure the sustained run is there to show.
    "net.ipv4.tcp_max_tw_buckets": "262144",
}


@dataclass(frozen=True, slots=True)
class Settings:
    runs: int
    tunnels: int
    concurrency: int
    bulk_bytes: int
    idle: int
    warmup: int
    sustained: int
    workers: tuple[int, ...]
    udp: int = 100000  # datagrams echoed through one UDP association per run
    figures: tuple[str, ...] = FIGURES  # --only
    namespaces: str = "shared"  # or "per-column": each column its own, for the whole run
    paths: tuple[str, ...] = ("noauth-ip",)  # --paths: keys of PATHS, the order of a round
    target_name: str = TARGET_NAME  # what hostname paths send (--target-name)
    client_password: str = PASSWORD  # what clients send (--password); the configured one


@dataclass(frozen=True, slots=True)
class Column:
    """One proxy set-up measured side by side with the others."""

    key: str  # "socksd-w1", "microsocks", "pproxy", "none"
    label: str
    argv: tuple[str, ...]  # empty for "no proxy"
    cpus: str | None  # taskset list for the proxy, None = not pinned
    udp: bool = False  # measured with UDP ASSOCIATE (baselines without it: skipped)
    tunnels_only: bool = False  # the floor (no back-pressure), and the paths but today's
    bulk_only: bool = False  # the C splice relay: a ceiling for the MiB/s figures only
    src: str = "src"  # the directory under tmp it runs from: a socksd snapshot
    path: str = "noauth-ip"  # the tunnel's handshake: a key of PATHS
    load_args: tuple[str, ...] = ()  # the load generator's options for that path


@dataclass(frozen=True, slots=True)
class Cpu:
    """CPU seconds (user + sys) used while one figure was measured."""

    load_s: float  # load generator + targets
    proxy_s: float  # every process of the proxy
    other_s: float  # the rest of the machine: other processes, ksoftirqd, steal


@dataclass(frozen=True, slots=True)
class Sample:
    """One figure of one run, with the CPU each side used while it was measured."""

    value: float
    wall_s: float
    cpu: Cpu
    failures: dict[str, int] = field(default_factory=dict)

    def pct(self, cpu_s: float) -> float:
        """`cpu_s` as a percentage of one core over this measurement."""
        return 100.0 * cpu_s / self.wall_s if self.wall_s > 0 else 0.0


# -- /proc ------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def tree_pids(root: int) -> list[int]:
    """`root` and all its descendants (the proxy's supervisor and workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat_fields(int(entry))[1])
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            children.setdefault(ppid, []).append(int(entry))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """user + sys CPU seconds of `pids` (each including all its threads)."""
    total = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
    return total / CLK_TCK


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far, steal included (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, f.readline().split()[1:9]
        )
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class CpuMeter:
    """CPU used from now on by the proxy, the load side and the rest of the machine."""

    def __init__(self, proxy_pids: list[int], world_pids: list[int]) -> None:
        """`world_pids`: what the proxy talks to besides the load generator (the
        targets, the DNS server); they count on the load side."""
        self.pids, self.world = proxy_pids, world_pids
        self.proxy0, self.world0 = cpu_seconds(proxy_pids), cpu_seconds(world_pids)
        self.machine0 = machine_busy_s()

    def read(self, loadgen_s: float) -> Cpu:
        """The split so far, given what the load generator used (it counts itself)."""
        load = loadgen_s + cpu_seconds(self.world) - self.world0
        proxy = cpu_seconds(self.pids) - self.proxy0
        return Cpu(load, proxy, machine_busy_s() - self.machine0 - load - proxy)


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


# -- set-up -----------------------------------------------------------------------------


def build_tools(tmp: Path) -> Path:
    """Compile the bench's C tools into `tmp`; never committed as binaries."""
    for name in ("loadgen", "target", "udpload", "splice_relay"):
        src = REPO / "bench" / f"{name}.c"
        out = subprocess.run(
            ["gcc", "-O2", "-Wall", "-pthread", "-o", str(tmp / name), str(src)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            sys.exit(f"perf: gcc failed on {src}:\n{out.stderr}")
    return tmp


def plan_cpus(workers: tuple[int, ...]) -> tuple[str | None, dict[int, str | None], list[str]]:
    """(load cpus, proxy cpus by socksd worker count (0 = a baseline), notes)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, dict.fromkeys((0, *workers)), ["1 CPU: nothing is pinned"]
    load = str(cpus[-1])
    proxy: dict[int, str | None] = {0: str(cpus[0])}
    notes = [f"baselines pinned to core {cpus[0]}, load generator + targets to core {load}"]
    for n in workers:
        if n < len(cpus):
            proxy[n] = ",".join(map(str, cpus[:n]))
        else:
            proxy[n] = ",".join(map(str, cpus))
            notes.append(
                f"socksd workers={n} is pinned to all {len(cpus)} cores: the load "
                f"generator and targets share core {load} with it"
            )
    return load, proxy, notes


def socksd_config(
    tmp: Path,
    name: str,
    workers: int,
    user_hash: str | None = None,
    extra: str = "",
    top: str = "",
) -> Path:
    """Write the config every socksd column runs with; `name` keeps its files apart.

    With `user_hash`, RFC 1929 is mandatory and USER is the one user, as for customers;
    `extra`: TOML tables added (a column that differs in one setting).
    """
    config = tmp / f"socksd-{name}.toml"
    auth = (
        f'[auth]\nmethod = "password"\n\n[auth.users]\n{USER} = "{user_hash}"\n\n'
        if user_hash
        else ""
    )
    config.write_text(
        f'listen = ["{HOST}:{PROXY_PORT}"]\nworkers = {workers}\n{top}\n[log]\nlevel = "info"\n\n'
        f'[control]\nsocket = "{tmp}/control-{name}.sock"\n\n{auth}{extra}'
        # The targets live on loopback (in the bench's namespace): opt in to them.
        # The rule check stays on the measured path.
        '[[access.destinations]]\naction = "allow"\nto = ["127.0.0.0/8"]\n'
    )
    return config


def tinyproxy_config(tmp: Path, path: TunnelPath) -> Path:
    """tinyproxy (C, threaded, packaged by Debian) as the HTTP CONNECT baseline: the
    bench's user, CONNECT allowed to the echo port, no log lines per request."""
    config = tmp / f"tinyproxy-{path.key}.conf"
    auth = f"BasicAuth {USER} {PASSWORD}\n" if path.auth else ""
    config.write_text(
        f"Port {PROXY_PORT}\nListen {HOST}\nTimeout 60\nMaxClients 2000\n"
        f"LogLevel Critical\nAllow 127.0.0.0/8\nConnectPort {ECHO_PORT}\n{auth}"
    )
    return config


def user_hash(python: str, src: Path) -> str:
    """USER's password hash for socksd's config, made by `socksd passwd` run in `src`."""
    out = subprocess.run(
        [python, "-m", "socksd", "passwd"],
        cwd=src,
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


def path_args(path: TunnelPath, settings: Settings) -> tuple[str, ...]:
    """The load generator's options for `path` (none for today's no-auth + IPv4)."""
    args: tuple[str, ...] = ("--http",) if path.http else ()
    if path.auth:
        args += ("--auth", f"{USER}:{settings.client_password}")
    if path.name:
        args += ("--target-name", settings.target_name)
    return args


def make_columns(
    settings: Settings,
    tmp: Path,
    python: str,
    proxy_cpus: dict[int, str | None],
    floor: bool = False,
    splice_relay: bool = False,
    against: tuple[Revision, ...] = (),
    baselines: tuple[str, ...] = BASELINES,
    accounting_off: bool = False,
) -> tuple[list[Column], list[str]]:
    """Every column of every path in --paths, path by path (the order of a round).

    On today's path (no auth + IPv4) the keys and labels are the old ones; on the
    others they carry the path's name, and only tunnels/s is measured there: the other
    figures are the proxy's, not the handshake's.
    """
    notes = []
    if "microsocks" in baselines and not shutil.which("microsocks"):
        notes.append("microsocks not installed (apt-get install microsocks): skipped")
    pproxy = shutil.which("pproxy", path=str(Path(python).parent)) or shutil.which("pproxy")
    if "pproxy" in baselines and not pproxy:
        notes.append("pproxy not installed (pip install pproxy): skipped")
    if pproxy and "pproxy" in baselines and any(PATHS[p].auth for p in settings.paths):
        notes.append("pproxy: no-auth paths only (its auth is not wired into the bench)")
    if "noproxy" in baselines and set(settings.paths) - {DEFAULT_PATH}:
        notes.append("no proxy: no-auth + IPv4 only (the other paths vary the SOCKS handshake)")
    auth = any(PATHS[p].auth for p in settings.paths)
    hashed = user_hash(python, tmp / "src") if auth else None  # the snapshot's `socksd passwd`
    columns = []
    for key in settings.paths:
        path = PATHS[key]
        cols = _path_columns(
            settings,
            tmp,
            python,
            proxy_cpus,
            path,
            hashed,
            floor,
            splice_relay,
            against,
            baselines,
            accounting_off,
        )
        if key == DEFAULT_PATH:
            columns += cols
            continue
        columns += [
            replace(
                col,
                key=f"{col.key}+{key}",
                label=f"{col.label} {key}",
                path=key,
                load_args=path_args(path, settings),
                tunnels_only=True,
                udp=False,
            )
            for col in cols
        ]
    if "udp" in settings.figures and DEFAULT_PATH in settings.paths:
        notes.append("UDP echo: socksd and no proxy only (microsocks has no UDP ASSOCIATE)")
    return _measurable(columns, settings.figures, notes), notes


def _path_columns(
    settings: Settings,
    tmp: Path,
    python: str,
    proxy_cpus: dict[int, str | None],
    path: TunnelPath,
    hashed: str | None,
    floor: bool,
    splice_relay: bool,
    against: tuple[Revision, ...],
    baselines: tuple[str, ...],
    accounting_off: bool,
) -> list[Column]:
    """The proxies that can take `path`, each set up for it (a user when it authenticates)."""
    columns = []
    default = path.key == DEFAULT_PATH
    user = hashed if path.auth else None
    http = 'protocols = ["socks5", "http"]\n' if path.http else ""
    for n in settings.workers:
        config = socksd_config(tmp, f"w{n}-{path.key}", n, user, top=http)
        argv: tuple[str, ...] = (python, "-m", "socksd", "--config", str(config))
        columns.append(Column(f"socksd-w{n}", f"socksd w={n}", argv, proxy_cpus[n], udp=True))
    # A revision runs with the first column's settings, so the two differ only in code.
    first = settings.workers[0]
    for rev in against:
        config = socksd_config(tmp, f"{rev.commit[:12]}-{path.key}", first, user, top=http)
        argv = (python, "-m", "socksd", "--config", str(config))
        key = f"socksd@{rev.name}"
        columns.append(Column(key, key, argv, proxy_cpus[first], udp=True, src=rev.src))
    if accounting_off:  # the same code and settings, per-customer accounting off
        off = "[accounting]\nenabled = false\n"
        config = socksd_config(tmp, f"noacct-{path.key}", first, user, off, top=http)
        argv = (python, "-m", "socksd", "--config", str(config))
        columns.append(
            Column("socksd-noacct", "socksd acct off", argv, proxy_cpus[first], udp=True)
        )
    tinyproxy = shutil.which("tinyproxy")
    if path.http:  # microsocks and pproxy speak no HTTP here: tinyproxy is the baseline
        if tinyproxy and "tinyproxy" in baselines:
            config = tinyproxy_config(tmp, path)
            columns.append(
                Column(
                    "tinyproxy", "tinyproxy", (tinyproxy, "-d", "-c", str(config)), proxy_cpus[0]
                )
            )
        return columns
    microsocks = shutil.which("microsocks")
    if microsocks and "microsocks" in baselines:
        argv = (microsocks, "-i", HOST, "-p", str(PROXY_PORT))
        if path.auth:
            argv += ("-u", USER, "-P", PASSWORD)
        columns.append(Column("microsocks", "microsocks", argv, proxy_cpus[0]))
    pproxy = shutil.which("pproxy", path=str(Path(python).parent)) or shutil.which("pproxy")
    if pproxy and "pproxy" in baselines and not path.auth:
        argv = (pproxy, "-l", f"socks5://{HOST}:{PROXY_PORT}")
        columns.append(Column("pproxy", "pproxy", argv, proxy_cpus[0]))
    if floor and not path.name:  # floor.py speaks IPv4 literals only, with or without auth
        argv = (python, str(REPO / "bench" / "floor.py"), HOST, str(PROXY_PORT))
        if path.auth:
            argv += (USER, PASSWORD)
        columns.append(Column("floor", "python floor", argv, proxy_cpus[0], tunnels_only=True))
    if splice_relay and default:
        argv = (str(tmp / "splice_relay"), HOST, str(PROXY_PORT), str(TARGET_LIFETIME_S))
        columns.append(Column("splice", "C splice", argv, proxy_cpus[0], bulk_only=True))
    if "noproxy" in baselines and default:
        columns.append(Column("none", "no proxy", (), None, udp=True))
    return columns


def _measurable(columns: list[Column], figures: tuple[str, ...], notes: list[str]) -> list[Column]:
    """The columns that have a figure in --only: the floor has no MiB/s, the relay only."""
    kept = []
    for col in columns:
        if col.bulk_only and "bulk" not in figures:
            notes.append(f"{col.label}: MiB/s only, and --only leaves it out: skipped")
        elif col.tunnels_only and "rate" not in figures:
            notes.append(f"{col.label}: tunnels/s only, and --only leaves it out: skipped")
        else:
            kept.append(col)
    return kept


@dataclass(frozen=True, slots=True)
class Revision:
    """A git revision of socksd measured next to the working tree (--against)."""

    name: str  # as given on the command line: the column is "socksd@NAME"
    commit: str  # its full hash: names its files, and goes into the report
    src: str  # the directory under tmp holding its socksd/ and workers/
    digest: str  # of those files, like the working tree's snapshot digest


def snapshot_revision(tmp: Path, name: str) -> Revision:
    """Extract socksd/ and workers/ of git revision `name` into `tmp` (`git archive`).

    The A/B of a refactoring needs the old code started exactly like the new: same
    Python, same config, same namespace, in the same rounds; only the files differ.
    """
    out = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{name}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        sys.exit(f"perf: --against {name}: not a git revision here")
    commit = out.stdout.strip()
    src = f"src-{commit}"
    (tmp / src).mkdir(exist_ok=True)  # two names for one commit: the same files
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "socksd", "workers"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp / src)], input=archive, check=True)
    return Revision(name, commit, src, _digest(tmp / src))


def _digest(src: Path) -> str:
    """Digest of the .py files of socksd/ and workers/ under `src`."""
    h = hashlib.sha256()
    for package in ("socksd", "workers"):
        for path in sorted((src / package).glob("*.py")):
            h.update(f"{package}/{path.name}".encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def snapshot_socksd(tmp: Path) -> str:
    """Copy socksd's packages into `tmp` (socksd runs from there); return their digest.

    Others edit the working tree while a run takes minutes: every run of every column
    then measures the same code, and a half-saved edit cannot break a later start.
    """
    for package in ("socksd", "workers"):
        dest = tmp / "src" / package
        shutil.copytree(REPO / package, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return _digest(tmp / "src")


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    if out.returncode != 0:
        return "?"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else ""


def versions(
    python: str, columns: list[Column], digest: str, against: tuple[Revision, ...] = ()
) -> dict[str, str]:
    commit = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _version(["git", "-C", str(REPO), "status", "--porcelain", "socksd", "workers"])
    changes = " + uncommitted changes" if dirty not in ("", "?") else ""
    revisions = {f"socksd@{r.name}": f"{r.commit[:12]}, snapshot {r.digest}" for r in against}
    return {
        "socksd": f"{commit}{changes}, snapshot {digest}",
        **revisions,
        "python": _version([python, "-c", "import sys; print(sys.version.split()[0])"]),
        "microsocks": _version(["dpkg-query", "-W", "-f", "${Version}", "microsocks"]),
        "pproxy": next(
            (_version([c.argv[0], "--version"]) for c in columns if c.key == "pproxy"), "-"
        ),
        "kernel": platform.release(),
        "cpus": str(len(os.sched_getaffinity(0))),
    }


# -- running ----------------------------------------------------------------------------


class RunningProxy:
    """A started proxy: its process (group leader) and its log file."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def pids(self) -> list[int]:
        return tree_pids(self.proc.pid)

    def stop(self) -> None:
        # INT: socksd's fast stop; the others just die. KILL if that takes over 5 s.
        for sig in (signal.SIGINT, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue


class Bench:
    """The namespace, the compiled tools, the targets and one measurement at a time."""

    def __init__(self, ns: NetNS, tmp: Path, settings: Settings, load_cpus: str | None) -> None:
        self.ns = ns
        self.tmp = tmp
        self.settings = settings
        self.pin_load = ["taskset", "-c", load_cpus] if load_cpus else []
        for key, value in SYSCTLS.items():
            ns.sysctl(key, value)
        argv = [str(tmp / "target"), HOST, str(ECHO_PORT), str(BULK_PORT), str(TARGET_LIFETIME_S)]
        self.target_pid = self.start_ready(argv, "target")
        self.world_pids = [self.target_pid]
        self._etc: Path | None = None
        self._dns: tuple[int, Path] | None = None  # dnsmasq's pid and log
        if any(PATHS[p].name for p in settings.paths):
            self.world_pids.append(self._start_dns())

    def start_ready(self, argv: list[str], what: str) -> int:
        """Start `argv` in the namespace, pinned to the load core, and wait for the
        "ready" line it prints; its pid (`ip netns exec` and taskset exec: the same)."""
        proc = self.ns.popen([*self.pin_load, *argv], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        if _read_line(proc.stdout, 10.0) != "ready":
            raise RuntimeError(f"{what} did not start")
        return proc.pid

    def close(self) -> None:
        """Remove what the bench put in /etc for its namespace (the namespace's own
        processes die with it)."""
        if self._etc is not None:
            shutil.rmtree(self._etc, ignore_errors=True)
            with contextlib.suppress(OSError):
                self._etc.parent.rmdir()  # /etc/netns, if nothing else is in it
            self._etc = None

    def _start_dns(self) -> int:
        """Start dnsmasq on the namespace's loopback and point the namespace at it.

        Customers send names, and socksd resolves each one with getaddrinfo in its
        resolver threads: a real DNS query per tunnel, as in production. dnsmasq keeps
        no cache (--cache-size=0), reads neither /etc/hosts nor /etc/resolv.conf, and
        answers TARGET_NAME from a host record with a TTL; any other name under .test
        gets NXDOMAIN and nothing is forwarded. `ip netns exec` bind-mounts
        /etc/netns/NAME/resolv.conf over /etc/resolv.conf for every process started
        in the namespace (proxies, load, this check), so they all ask it. Pinned with
        the load and counted on the load side: it is the world the proxy talks to.
        """
        self._etc = Path("/etc/netns") / self.ns.name
        self._etc.mkdir(parents=True, exist_ok=True)
        (self._etc / "resolv.conf").write_text(f"nameserver {DNS_ADDR}\n")
        argv = [
            *self.pin_load,
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            f"--listen-address={DNS_ADDR}",
            "--bind-interfaces",
            "--port=53",
            "--no-resolv",
            "--no-hosts",
            "--cache-size=0",
            f"--host-record={TARGET_NAME},{HOST},{DNS_TTL}",
            "--local=/test/",
            "--log-facility=-",
            f"--pid-file={self.tmp}/dnsmasq-{self.ns.name}.pid",
        ]
        log = self.tmp / f"dnsmasq-{self.ns.name}.log"
        with open(log, "wb") as out:
            proc = self.ns.popen(argv, stdout=out, stderr=out)
        # Ready when the whole chain answers: resolv.conf, glibc, dnsmasq.
        for _ in range(100):
            got = self.ns.run(
                ["getent", "ahosts", TARGET_NAME], check=False, capture_output=True, timeout=10
            )
            if got.returncode == 0 and got.stdout.split()[:1] == [HOST.encode()]:
                self._dns = (proc.pid, log)
                return proc.pid
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        tail = log.read_text(errors="replace")[-2000:]
        self.close()
        raise RuntimeError(f"dnsmasq did not answer {TARGET_NAME}; its log:\n{tail}")

    # -- proxies --

    def start(self, col: Column, tag: str) -> RunningProxy:
        # A revision's name may hold a "/" (origin/main): not a directory here.
        name = re.sub(r"[^\w@+.-]", "_", col.key)
        log = self.tmp / f"{name}-{tag}.log"
        with open(log, "wb") as out:
            pin = ["taskset", "-c", col.cpus] if col.cpus else []
            # `python -m` puts the cwd first on sys.path: socksd runs from the snapshot.
            cwd = self.tmp / col.src
            proc = self.ns.popen([*pin, *col.argv], cwd=cwd, stdout=out, stderr=out)
        proxy = RunningProxy(proc, log)
        ready = self._socksd_ready if col.key.startswith("socksd") else self._port_open
        deadline = time.monotonic() + 30.0
        for _ in range(300):
            if proc.poll() is not None:
                break
            if ready(proxy):
                return proxy
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        proxy.stop()
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{col.label} did not become ready; log tail:\n{tail}")

    @staticmethod
    def _socksd_ready(proxy: RunningProxy) -> bool:
        # The listen sockets exist before the workers do; the supervisor says when
        # every worker is serving.
        return b'"supervisor_ready"' in proxy.log.read_bytes()

    def _port_open(self, _proxy: RunningProxy) -> bool:
        sock = self.ns.socket()
        try:
            sock.settimeout(0.5)
            return sock.connect_ex((HOST, PROXY_PORT)) == 0
        finally:
            sock.close()

    def dns_queries(self) -> int | None:
        """Queries dnsmasq answered so far (None: no dnsmasq): it logs them on SIGUSR1.

        The proof that every hostname tunnel cost a real DNS query: nothing between
        socksd and dnsmasq (no nscd, no cache) answered instead.
        """
        if self._dns is None:
            return None
        pid, log = self._dns
        mark = "queries answered locally"
        before = log.read_text(errors="replace").count(mark)
        os.kill(pid, signal.SIGUSR1)
        for _ in range(100):
            text = log.read_text(errors="replace")
            if text.count(mark) > before:
                found = re.findall(r"queries forwarded (\d+), queries answered locally (\d+)", text)
                return sum(map(int, found[-1]))
            time.sleep(0.02)
        return None

    def time_wait(self) -> int:
        """TCP sockets in TIME_WAIT in the namespace now (/proc/net/sockstat there)."""
        out = self.ns.run(["cat", "/proc/net/sockstat"], capture_output=True, timeout=10)
        for line in out.stdout.decode().splitlines():
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("tw") + 1])
        return -1

    def wait_quiet(self, proxy: RunningProxy | None) -> None:
        """Wait (at most 5 s) until the proxy and the targets have stopped using CPU."""
        pids = self.world_pids + (proxy.pids() if proxy else [])
        for _ in range(25):
            before = cpu_seconds(pids)
            time.sleep(0.2)
            if cpu_seconds(pids) - before < 0.01:
                return

    # -- load --

    def loadgen(self, mode: str, proxy: RunningProxy | None, *extra: str) -> list[str]:
        argv = [*self.pin_load, str(self.tmp / "loadgen"), mode]
        if proxy is not None:
            argv += ["--proxy", f"{HOST}:{PROXY_PORT}"]
        port = BULK_PORT if mode == "bulk" else ECHO_PORT
        argv += ["--target", f"{HOST}:{port}", "--src", CLIENT_SRC]
        return [*argv, "--src-count", str(CLIENT_SRC_COUNT), *extra]

    def measure(
        self, proxy: RunningProxy | None, argv: list[str], deadline_s: float
    ) -> tuple[dict[str, Any], Cpu]:
        """Run one load; return its JSON result and the CPU used meanwhile."""
        meter = CpuMeter(proxy.pids() if proxy else [], self.world_pids)
        proc = self.ns.popen([*argv, "--deadline-s", str(int(deadline_s))], stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=deadline_s + 30)
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return result, meter.read(result["user_s"] + result["sys_s"])

    def tunnels(
        self, proxy: RunningProxy | None, total: int, path_args: tuple[str, ...] = ()
    ) -> dict[str, Sample]:
        """`total` tunnels, C in flight; `path_args`: the path's loadgen options."""
        argv = self.loadgen(
            "tunnels",
            proxy,
            "--total",
            str(total),
            "--concurrency",
            str(self.settings.concurrency),
            "--timeout-ms",
            "10000",
            *path_args,
        )
        r, cpu = self.measure(proxy, argv, 30 + total / 200)
        wall = r["elapsed_s"]
        samples = {
            "tunnels_per_s": Sample(r["rate"], wall, cpu, r["failures"]),
            "tunnels_ok": Sample(r["ok"], wall, cpu),
            "ttfb_p50_ms": Sample(r["ttfb_us"]["p50"] / 1000, wall, cpu),
            "ttfb_p99_ms": Sample(r["ttfb_us"]["p99"] / 1000, wall, cpu),
        }
        if proxy is not None and cpu.proxy_s > 0:
            # Tunnels per second of proxy CPU: the per-core efficiency, which shows
            # whether N workers scale even where the load has to share their cores.
            per_core = r["ok"] / cpu.proxy_s
            samples["tunnels_per_core_s"] = Sample(per_core, wall, cpu)
        if proxy is not None and r["ok"]:
            # The same, inverted: what an A/B of two revisions compares.
            per_tunnel = cpu.proxy_s / r["ok"] * 1e6
            samples["cpu_us_per_tunnel"] = Sample(per_tunnel, wall, cpu)
        return samples

    def bulk(self, proxy: RunningProxy | None, streams: int) -> Sample:
        size = self.settings.bulk_bytes
        argv = self.loadgen(
            "bulk",
            proxy,
            "--discard",
            "--concurrency",
            str(streams),
            "--bytes",
            str(size),
            "--timeout-ms",
            "120000",
        )
        r, cpu = self.measure(proxy, argv, 30 + size / (20 << 20))
        return Sample(r["mib_s"], r["elapsed_s"], cpu, r["failures"])

    def udp(self, proxy: RunningProxy | None) -> Sample:
        """Datagrams per second echoed through one UDP association (or straight)."""
        argv = [*self.pin_load, str(self.tmp / "udpload")]
        if proxy is not None:
            argv += ["--proxy", f"{HOST}:{PROXY_PORT}"]
        argv += ["--target", f"{HOST}:{ECHO_PORT}", "--src", CLIENT_SRC]
        argv += ["--total", str(self.settings.udp), "--window", "32"]
        r, cpu = self.measure(proxy, argv, 30 + self.settings.udp / 2000)
        lost = {"udp_lost": r["lost"]} if r["lost"] else {}
        return Sample(r["rate"], r["elapsed_s"], cpu, lost)

    def idle_rss(self, proxy: RunningProxy) -> Sample:
        """Hold N idle tunnels; RSS per tunnel = (RSS holding them - RSS before) / held."""
        n = self.settings.idle
        open_s = 30 + n / 200
        argv = self.loadgen(
            "hold",
            proxy,
            "--total",
            str(n),
            "--concurrency",
            str(self.settings.concurrency),
            "--timeout-ms",
            "10000",
            "--deadline-s",
            str(int(open_s + 60)),
        )
        self.wait_quiet(proxy)
        pids = proxy.pids()
        rss0, meter = rss_bytes(pids), CpuMeter(pids, self.world_pids)
        proc = self.ns.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        assert proc.stdout is not None
        line = _read_line(proc.stdout, open_s + 10)  # "held N", or the JSON if it gave up
        cpu = meter.read(cpu_seconds([proc.pid]))  # the opening, not the holding
        rss1 = None
        if line.startswith("held"):
            time.sleep(1.0)  # let the proxy finish its per-tunnel bookkeeping
            rss1 = rss_bytes(proxy.pids())
        out, _ = proc.communicate(timeout=60)  # closes stdin: the load closes its tunnels
        r = json.loads(line if line.startswith("{") else out.decode().strip().splitlines()[-1])
        held = r["held"]
        value = (rss1 - rss0) / held / 1024 if rss1 is not None and held else float("nan")
        failures = dict(r["failures"])
        if held < n:
            failures.setdefault("not_held", n - held)
        return Sample(value, r["elapsed_s"], cpu, failures)


def _read_line(stream: Any, timeout: float) -> str:
    """One line from a child's stdout pipe, waiting at most `timeout` seconds."""
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while not data.endswith(b"\n") and len(data) < 65536:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            chunk = os.read(stream.fileno(), 1)  # byte by byte: nothing past the line
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").strip()


# -- one column, one run ----------------------------------------------------------------


def run_column(bench: Bench, col: Column, run: int) -> dict[str, Sample]:
    s = bench.settings
    proxy = bench.start(col, f"run{run}") if col.argv else None
    try:
        # Also fills socksd's cache of verified passwords (scrypt, ~40 ms, once per
        # worker): a customer's steady traffic finds it warm too.
        warm = bench.tunnels(proxy, s.warmup, col.load_args)["tunnels_per_s"]
        if warm.value == 0:
            # A wrong password or an unknown name: a row of failures, not a dead run.
            print(f"{col.label}: no warm-up tunnel succeeded: {warm.failures}")
            return {"tunnels_per_s": warm}
        samples: dict[str, Sample] = {}
        if not col.bulk_only:
            if proxy is not None and "rss" in s.figures and not col.tunnels_only:
                samples["rss_kib_per_idle"] = bench.idle_rss(proxy)
            if "rate" in s.figures:
                bench.wait_quiet(proxy)
                # What the column before left behind: every connect() pays for it.
                tw = Sample(bench.time_wait(), 0, Cpu(0, 0, 0))
                q0 = bench.dns_queries() if PATHS[col.path].name else None
                samples.update(bench.tunnels(proxy, s.tunnels, col.load_args))
                samples["time_wait_at_start"] = tw
                q1 = bench.dns_queries() if q0 is not None else None
                ok = samples["tunnels_ok"].value
                if q0 is not None and q1 is not None and ok:
                    # 2 with glibc's getaddrinfo: an A and an AAAA query per lookup
                    samples["dns_queries_per_tunnel"] = Sample((q1 - q0) / ok, 0, Cpu(0, 0, 0))
        for streams in (1, 8) if "bulk" in s.figures and not col.tunnels_only else ():
            bench.wait_quiet(proxy)
            samples[f"mib_s_{streams}"] = bench.bulk(proxy, streams)
        if col.udp and "udp" in s.figures and not col.tunnels_only:
            bench.wait_quiet(proxy)
            samples["udp_dgrams_s"] = bench.udp(proxy)
    finally:
        if proxy is not None:
            proxy.stop()
    if proxy is not None and col.key.startswith("socksd"):
        # Counted after the stop, so lines the logger still buffered are in (or lost).
        log = proxy.log.read_bytes()
        # TCP tunnels only: the UDP figure's association has its own closing line.
        lines = log.count(b'"tunnel_closed"') - log.count(b'"command":"udp_associate"')
        samples["tunnel_closed_lines"] = Sample(lines, 0, Cpu(0, 0, 0))
    return samples


# -- report -----------------------------------------------------------------------------

ROWS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("tunnels_per_s", "tunnels/s", lambda v: f"{v:,.0f}"),
    ("tunnels_per_core_s", "tunnels/proxy CPU-s", lambda v: f"{v:,.0f}"),
    ("cpu_us_per_tunnel", "proxy CPU us/tunnel", lambda v: f"{v:.1f}"),
    ("ttfb_p50_ms", "TTFB p50 ms", lambda v: f"{v:.2f}"),
    ("ttfb_p99_ms", "TTFB p99 ms", lambda v: f"{v:.2f}"),
    ("mib_s_1", "MiB/s 1 stream", lambda v: f"{v:,.0f}"),
    ("mib_s_8", "MiB/s 8 streams", lambda v: f"{v:,.0f}"),
    ("rss_kib_per_idle", "RSS/idle tunnel KiB", lambda v: f"{v:.1f}"),
    ("udp_dgrams_s", "UDP echo dgrams/s", lambda v: f"{v:,.0f}"),
)
CPU_ROWS = (
    ("tunnels_per_s", "tunnels (+TTFB)"),
    ("mib_s_1", "1 stream"),
    ("mib_s_8", "8 streams"),
    ("rss_kib_per_idle", "opening idle"),
    ("udp_dgrams_s", "UDP echo"),
)


def summarize(runs: dict[str, list[dict[str, Sample]]]) -> dict[str, Any]:
    medians: dict[str, dict[str, float]] = {}
    cpu: dict[str, dict[str, dict[str, float]]] = {}
    failures: dict[str, dict[str, int]] = {}
    for key, samples in runs.items():
        medians[key], cpu[key], failures[key] = {}, {}, {}
        for metric in {m for run in samples for m in run}:
            got = [run[metric] for run in samples if metric in run]
            medians[key][metric] = statistics.median(s.value for s in got)
            cpu[key][metric] = {
                "load_pct": statistics.median(s.pct(s.cpu.load_s) for s in got),
                "proxy_pct": statistics.median(s.pct(s.cpu.proxy_s) for s in got),
                "other_pct": statistics.median(s.pct(s.cpu.other_s) for s in got),
            }
            for s in got:
                for kind, count in s.failures.items():
                    failures[key][kind] = failures[key].get(kind, 0) + count
    return {"medians": medians, "cpu_pct": cpu, "failures": failures}


_BASELINES = (
    ("microsocks", "microsocks"),
    ("pproxy", "pproxy"),
    ("floor", "floor"),
    ("splice", "C-splice"),
)


def ratios(medians: dict[str, dict[str, float]], ours: str) -> dict[str, dict[str, float]]:
    out = {}
    for other, name in (*_BASELINES, ("none", "no-proxy")):
        if other in medians and ours in medians:
            out[f"socksd/{name}"] = {
                metric: medians[ours][metric] / medians[other][metric]
                for metric, _, _ in ROWS
                if medians[other].get(metric) and metric in medians[ours]
            }
    return out


def paired_ratios(
    runs: dict[str, list[dict[str, Sample]]], ours: str
) -> dict[str, dict[str, list[float]]]:
    """socksd / baseline within each run (both measured minutes apart), per metric.

    A host that drifts during a run moves both sides of a pair alike, so the median of
    these is steadier than the ratio of the two medians.
    """
    out: dict[str, dict[str, list[float]]] = {}
    for other, name in _BASELINES:
        if other not in runs or ours not in runs:
            continue
        per_metric: dict[str, list[float]] = {}
        for metric in ("tunnels_per_s", "tunnels_per_core_s", "ttfb_p99_ms", "mib_s_1", "mib_s_8"):
            pairs = [
                a[metric].value / b[metric].value
                for a, b in zip(runs[ours], runs[other], strict=False)
                if metric in a and metric in b and b[metric].value
            ]
            if pairs:
                per_metric[metric] = sorted(pairs)
        out[f"socksd/{name}"] = per_metric
    return out


def print_paired(paired: dict[str, dict[str, list[float]]]) -> None:
    if not any(paired.values()):
        return
    print("\nPer-run ratios (socksd / baseline in the same run): median [lowest-highest]")
    for name, metrics in paired.items():
        cells = [
            f"{metric} {statistics.median(v):.2f} [{v[0]:.2f}-{v[-1]:.2f}]"
            for metric, v in metrics.items()
        ]
        print(f"  {name:20} " + "   ".join(cells))


ROUND_METRICS = (("tunnels_per_s", "tunnels/s"), ("cpu_us_per_tunnel", "CPU/tunnel"))


def references(columns: list[Column]) -> dict[str, Column]:
    """Each column's reference: the first column of its path (socksd, working tree)."""
    first: dict[str, Column] = {}
    for col in columns:
        first.setdefault(col.path, col)
    return {col.key: first[col.path] for col in columns}


def _ratios(
    runs: dict[str, list[dict[str, Sample]]], key: str, ref: str
) -> dict[str, list[float | None]]:
    """runs[key] / runs[ref] round by round, per ROUND_METRICS; None where one is missing."""
    return {
        metric: [
            a[metric].value / b[metric].value
            if metric in a and metric in b and b[metric].value
            else None
            for a, b in zip(runs[key], runs[ref], strict=False)
        ]
        for metric, _ in ROUND_METRICS
    }


def round_ratios(
    runs: dict[str, list[dict[str, Sample]]], columns: list[Column]
) -> dict[str, dict[str, list[float | None]]]:
    """Each column / its path's first column (socksd, working tree) within each round.

    The figure an A/B of two revisions quotes: both ran in the same round, seconds
    apart, so a host that drifts from round to round moves both alike. None where a
    side has no such figure (no proxy has no proxy CPU).
    """
    refs = references(columns)
    return {
        col.key: _ratios(runs, col.key, refs[col.key].key)
        for col in columns
        if refs[col.key] is not col
    }


def path_ratios(
    runs: dict[str, list[dict[str, Sample]]], columns: list[Column]
) -> dict[str, dict[str, list[float | None]]]:
    """Each column on a path / the same proxy on no auth + IPv4, within each round.

    What the customer's handshake costs a proxy against the bench's old path: the
    price of RFC 1929 and of a DNS lookup per tunnel.
    """
    keys = {col.key for col in columns}
    return {
        col.key: _ratios(runs, col.key, base)
        for col in columns
        if col.path != DEFAULT_PATH and (base := col.key.partition("+")[0]) in keys
    }


def _range(values: list[float | None]) -> str:
    """'median [lowest-highest]' of the values present."""
    got = sorted(v for v in values if v is not None)
    if not got:
        return "-"
    return f"{statistics.median(got):.3f} [{got[0]:.3f}-{got[-1]:.3f}]"


def print_rounds(
    runs: dict[str, list[dict[str, Sample]]],
    columns: list[Column],
    by_round: dict[str, dict[str, list[float | None]]],
) -> None:
    """Every round's tunnels/s and proxy CPU per tunnel, then the median per-round ratio."""
    refs = references(columns)
    width = max(len(c.label) for c in columns) + 1
    print(
        "\nPer round: tunnels/s, proxy CPU (user + sys) per tunnel, failures, and the ratio "
        "to the first column of the path (socksd, working tree) in the same round"
    )
    rounds = len(runs[columns[0].key])
    for r in range(rounds):
        for col in columns:
            got = runs[col.key][r]
            if "tunnels_per_s" not in got:
                continue
            rate = got["tunnels_per_s"]
            cpu = got.get("cpu_us_per_tunnel")
            line = (
                f"  round {r + 1:<3} {col.label:{width}} {rate.value:9,.0f} tunnels/s "
                + (f"{cpu.value:8.1f} us CPU/tunnel" if cpu else f"{'-':>8} us CPU/tunnel")
                + f"  failures {sum(rate.failures.values())}"
            )
            if "time_wait_at_start" in got:
                line += f"  TIME_WAIT at start {got['time_wait_at_start'].value:,.0f}"
            if "dns_queries_per_tunnel" in got:
                line += f"  DNS queries/tunnel {got['dns_queries_per_tunnel'].value:.2f}"
            if col.key in by_round:
                cells = [
                    f"{label} {v:.3f}" if (v := by_round[col.key][m][r]) is not None else ""
                    for m, label in ROUND_METRICS
                ]
                if any(cells):
                    line += f"   / {refs[col.key].label}: " + "  ".join(c for c in cells if c)
            print(line)
    print(
        f"\nMedian of the per-round ratios [lowest-highest] over {rounds} rounds "
        "(tunnels/s above 1: faster than the working tree; CPU/tunnel above 1: more CPU "
        "per tunnel than the working tree)"
    )
    for col in columns:
        if col.key in by_round:
            cells = [f"{label} {_range(by_round[col.key][m])}" for m, label in ROUND_METRICS]
            print(f"  {col.label:{width}} / {refs[col.key].label:{width}} " + "   ".join(cells))


def print_paths(
    columns: list[Column],
    summary: dict[str, Any],
    by_round: dict[str, dict[str, list[float | None]]],
    by_path: dict[str, dict[str, list[float | None]]],
) -> None:
    """One row per path and proxy: the customer's path first, today's path last."""
    med, fails = summary["medians"], summary["failures"]
    print(
        "\nPaths (medians over the rounds; ratios: median of the per-round ratios "
        "[lowest-highest], to socksd on the same path, and to the same proxy on "
        f"{PATHS[DEFAULT_PATH].label})"
    )
    head = (
        f"  {'path':26}{'proxy':18}{'tunnels/s':>10}{'CPU us':>8}{'TTFB p99':>10}"
        f"{'failures':>9}{'DNS q/tun':>10}   {'tunnels/s / socksd':24}{'CPU / socksd':24}"
        f"{'tunnels/s / ' + DEFAULT_PATH:26}{'CPU / ' + DEFAULT_PATH}"
    )
    print(head)
    shown = None
    for col in columns:
        m = med[col.key]
        if "tunnels_per_s" not in m:
            continue
        path = PATHS[col.path].label if col.path != shown else ""
        shown = col.path
        name = col.label.removesuffix(f" {col.path}")
        cpu = f"{m['cpu_us_per_tunnel']:.1f}" if "cpu_us_per_tunnel" in m else "-"
        p99 = f"{m['ttfb_p99_ms']:.2f}" if "ttfb_p99_ms" in m else "-"
        dns = f"{m['dns_queries_per_tunnel']:.2f}" if "dns_queries_per_tunnel" in m else "-"
        cells = [
            _range(ratios[col.key][metric]) if col.key in ratios else ""
            for ratios in (by_round, by_path)
            for metric, _ in ROUND_METRICS
        ]
        print(
            f"  {path:26}{name:18}{m['tunnels_per_s']:>10,.0f}{cpu:>8}{p99:>10}"
            f"{sum(fails[col.key].values()):>9}{dns:>10}   "
            f"{cells[0]:24}{cells[1]:24}{cells[2]:26}{cells[3]}"
        )
        if fails[col.key]:
            print(f"  {'':26}{'':18}failures: {fails[col.key]}")


def print_table(columns: list[Column], summary: dict[str, Any], ratio: dict[str, Any]) -> None:
    med, fails = summary["medians"], summary["failures"]
    heads = [c.label for c in columns] + list(ratio)
    width = max(13, *(len(h) + 2 for h in heads))
    print(f"\n{'':22}" + "".join(f"{h:>{width}}" for h in heads))
    for metric, label, fmt in ROWS:
        if not any(metric in med[c.key] for c in columns):
            continue  # a figure --only left out
        cells = [fmt(med[c.key][metric]) if metric in med[c.key] else "-" for c in columns]
        cells += [f"{r[metric]:.2f}" if metric in r else "-" for r in ratio.values()]
        print(f"{label:22}" + "".join(f"{c:>{width}}" for c in cells))
    cells = [str(sum(fails[c.key].values())) for c in columns]
    print(f"{'failures (all runs)':22}" + "".join(f"{c:>{width}}" for c in cells))
    for c in columns:
        if fails[c.key]:
            print(f"  {c.label} failures: {fails[c.key]}")

    print(
        "\nCPU % of one core during each figure (median): L = load side, P = proxy side,"
        " O = rest of the machine (other processes, ksoftirqd, steal)"
    )
    print(f"{'':22}" + "".join(f"{c.label:>{width}}" for c in columns))
    for metric, label in CPU_ROWS:
        if not any(metric in summary["cpu_pct"][c.key] for c in columns):
            continue
        cells = []
        for c in columns:
            got = summary["cpu_pct"][c.key].get(metric)
            cells.append(
                # max(0): tick rounding can make the remainder slightly negative
                f"L{got['load_pct']:.0f} P{got['proxy_pct']:.0f} O{max(0, got['other_pct']):.0f}"
                if got
                else "-"
            )
        print(f"{label:22}" + "".join(f"{x:>{width}}" for x in cells))
    for share, limit, meaning in (
        ("load_pct", LOAD_BOUND_PCT, "the load side was busy: may be load-bound, a lower bound"),
        ("other_pct", DISTURBED_PCT, "the rest of the machine was busy: disturbed"),
    ):
        flagged = [
            f"{c.label} {label}"
            for metric, label in CPU_ROWS
            for c in columns
            if summary["cpu_pct"][c.key].get(metric, {}).get(share, 0) >= limit
        ]
        if flagged:
            print(f"{share} >= {limit} % ({meaning}): {', '.join(flagged)}")


def sustained(bench: Bench, col: Column) -> dict[str, Any]:
    proxy = bench.start(col, "sustained")
    try:
        samples = bench.tunnels(proxy, bench.settings.sustained, col.load_args)
    finally:
        proxy.stop()
    s = samples["tunnels_per_s"]
    return {
        "proxy": col.label,
        "tunnels": bench.settings.sustained,
        "ok": int(samples["tunnels_ok"].value),
        "tunnels_per_s": s.value,
        "failures": s.failures,
        "cpu_pct": {k: s.pct(v) for k, v in asdict(s.cpu).items()},
    }


# -- main -------------------------------------------------------------------------------


def parse_args() -> tuple[argparse.Namespace, Settings]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, help="runs per figure (default 3; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help="small smoke run, under a minute")
    ap.add_argument("--workers", default="1,2", help="socksd worker counts, e.g. 1,2")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--tunnels", type=int, help="tunnels per run (default 20,000)")
    ap.add_argument("--bulk-mib", type=int, help="MiB per throughput figure (default 1024)")
    ap.add_argument("--idle", type=int, help="idle tunnels to hold (default 10,000)")
    ap.add_argument("--sustained", type=int, help="sustained tunnels (default 60,000; 0 = skip)")
    ap.add_argument("--python", default=sys.executable, help="Python that runs socksd")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="add bench/floor.py (the least Python a tunnel can cost) as a tunnels-only column",
    )
    ap.add_argument(
        "--splice-relay",
        action="store_true",
        help="add bench/splice_relay.c (a minimal C splice relay) as a MiB/s-only column",
    )
    ap.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="REV",
        help="also run socksd from git revision REV (repeatable), same config as the first "
        "--workers column, interleaved with the others in every run",
    )
    ap.add_argument(
        "--only",
        metavar="FIGURES",
        help=f"measure only these figures, comma-separated from {','.join(FIGURES)} "
        "(e.g. --only rate: tunnels/s, TTFB and proxy CPU per tunnel)",
    )
    ap.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        metavar="LIST",
        help=f"baseline columns, comma-separated from {','.join(BASELINES)}, or none "
        "(default: all)",
    )
    ap.add_argument(
        "--namespaces",
        choices=("shared", "per-column"),
        default="shared",
        help="one namespace for all columns (default), or one per column for the whole "
        "run, so that no column inherits another's TIME_WAIT sockets",
    )
    ap.add_argument(
        "--paths",
        default=DEFAULT_PATH,
        metavar="LIST",
        help=f"tunnel paths, comma-separated from {','.join(PATHS)}, or all; the first is "
        f"the headline (default {DEFAULT_PATH}: no auth, IPv4 literal)",
    )
    ap.add_argument(
        "--target-name",
        default=TARGET_NAME,
        help=f"name the hostname paths send (default {TARGET_NAME}, which dnsmasq answers; "
        "another name under .test gets NXDOMAIN: a check that failures show)",
    )
    ap.add_argument(
        "--password",
        default=PASSWORD,
        help="password the clients send on the user/password paths (default: the configured "
        "one; another one is a check that failures show)",
    )
    ap.add_argument(
        "--accounting-off",
        action="store_true",
        help="add socksd with [accounting] enabled = false (same code and settings as the "
        "first --workers column): the A/B of the per-customer accounting's cost",
    )
    ap.add_argument("--keep-logs", action="store_true", help="keep the temp dir and its logs")
    args = ap.parse_args()
    quick = args.quick
    workers = tuple(int(w) for w in args.workers.split(",") if w.strip())
    if not workers or min(workers) < 1:
        ap.error("--workers takes positive numbers, e.g. 1,2")
    figures = _choice_list(ap, "--only", args.only or ",".join(FIGURES), FIGURES)

    args.baselines = _choice_list(ap, "--baselines", args.baselines, BASELINES)
    paths = path_list(ap, args.paths)
    settings = Settings(
        runs=args.runs or (1 if quick else 3),
        tunnels=args.tunnels or (2000 if quick else 20000),
        concurrency=64,
        bulk_bytes=(args.bulk_mib or (64 if quick else 1024)) << 20,
        idle=args.idle or (1000 if quick else 10000),
        warmup=200 if quick else 500,
        sustained=args.sustained if args.sustained is not None else (6000 if quick else 60000),
        udp=10000 if quick else 100000,
        workers=workers,
        figures=figures,
        namespaces=args.namespaces,
        paths=paths,
        target_name=args.target_name,
        client_password=args.password,
    )
    return args, settings


def _choice_list(
    ap: argparse.ArgumentParser, option: str, text: str, choices: tuple[str, ...]
) -> tuple[str, ...]:
    """Parse 'a,b' against `choices` ('none' = empty), kept in the order of `choices`."""
    got = {w.strip() for w in text.split(",") if w.strip()} - {"none"}
    unknown = got - set(choices)
    if unknown:
        ap.error(f"{option}: unknown {', '.join(sorted(unknown))}; choose from {choices}")
    return tuple(c for c in choices if c in got)


def path_list(ap: argparse.ArgumentParser, text: str) -> tuple[str, ...]:
    """--paths: keys of PATHS in the order given (the first is the headline), or all."""
    if text.strip() == "all":
        return tuple(PATHS)
    words = tuple(dict.fromkeys(w.strip() for w in text.split(",") if w.strip()))
    unknown = set(words) - set(PATHS)
    if unknown or not words:
        ap.error(f"--paths: unknown {', '.join(sorted(unknown))}; choose from {tuple(PATHS)}")
    return words


def preflight(args: argparse.Namespace, settings: Settings) -> tuple[Settings, list[str]]:
    """Check root and socksd's Python; raise our fd limit; fit N idle tunnels under it."""
    if os.geteuid() != 0:
        sys.exit("perf: run as root (it creates a network namespace)")
    check = subprocess.run(
        [args.python, "-c", "import orjson, structlog, setproctitle"],
        capture_output=True,
        timeout=30,
    )
    if check.returncode != 0:
        sys.exit(f"perf: {args.python} lacks socksd's dependencies; run the venv's python")
    if any(PATHS[p].name for p in settings.paths) and not shutil.which("dnsmasq"):
        sys.exit("perf: the hostname paths need dnsmasq (apt-get install dnsmasq-base)")
    # Every process we start inherits this; a single-process proxy needs 2 fds per tunnel.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    idle = min(settings.idle, (hard - FD_MARGIN) // 2)
    if idle == settings.idle or "rss" not in settings.figures:
        return settings, []
    note = (
        f"RSS/idle tunnel at N = {idle:,} held tunnels, not {settings.idle:,}: "
        f"RLIMIT_NOFILE hard limit {hard:,} and a single-process proxy needs 2 fds "
        f"per tunnel (+{FD_MARGIN} spare)"
    )
    return Settings(**{**asdict(settings), "idle": idle}), [note]


def _benches(
    stack: contextlib.ExitStack,
    tmp: Path,
    settings: Settings,
    columns: list[Column],
    load_cpus: str | None,
) -> dict[str, Bench]:
    """The namespace (with its targets) each column runs in, closed with `stack`.

    Shared, a column starts among the TIME_WAIT sockets of the columns before it (tens
    of thousands per tunnels/s figure, 60 s each), and their number grows over the run.
    Per column, each inherits only its own from its previous round: the same for A
    and B by construction, which an A/B of two revisions wants.
    """

    def new() -> Bench:
        bench = Bench(stack.enter_context(NetNS("perf")), tmp, settings, load_cpus)
        stack.callback(bench.close)
        return bench

    if settings.namespaces == "per-column":
        return {c.key: new() for c in columns}
    return dict.fromkeys((c.key for c in columns), new())


def measure_all(
    tmp: Path, settings: Settings, columns: list[Column], load_cpus: str | None
) -> tuple[dict[str, list[dict[str, Sample]]], dict[str, Any] | None]:
    """Every run of every column, then the sustained run."""
    runs: dict[str, list[dict[str, Sample]]] = {c.key: [] for c in columns}
    with contextlib.ExitStack() as stack:
        benches = _benches(stack, tmp, settings, columns, load_cpus)
        for run in range(1, settings.runs + 1):
            for col in columns:  # interleaved, so a drift hits every column alike
                t0 = time.monotonic()
                samples = run_column(benches[col.key], col, run)
                runs[col.key].append(samples)
                figures = " ".join(f"{m}={s.value:,.2f}" for m, s in samples.items())
                took = time.monotonic() - t0
                print(f"run {run}/{settings.runs} {col.label:12} {figures}  ({took:.0f} s)")
    sus = None
    if settings.sustained and "sustained" in settings.figures:
        with NetNS("perf") as ns:  # fresh: no TIME_WAIT left over from the runs above
            bench = Bench(ns, tmp, settings, load_cpus)
            try:
                sus = sustained(bench, columns[0])
            finally:
                bench.close()
    return runs, sus


def print_extras(
    columns: list[Column], summary: dict[str, Any], sus: Any, settings: Settings
) -> None:
    figures = settings.figures
    for c in columns:
        # warm-up + idle + the tunnels figure + the 1 + 8 bulk streams, as far as measured
        more = not c.tunnels_only
        tunnels_per_run = (
            settings.warmup
            + (settings.idle if "rss" in figures and more else 0)
            + (settings.tunnels if "rate" in figures else 0)
            + (9 if "bulk" in figures and more else 0)
        )
        lines = summary["medians"][c.key].get("tunnel_closed_lines")
        if lines is not None:
            print(
                f"{c.label}: {lines:,.0f} tunnel_closed log lines per run (median) for "
                f"{tunnels_per_run:,} tunnels"
            )
    if sus is not None:
        verdict = "PASS" if not sus["failures"] else "FAIL"
        print(
            f"sustained: {sus['tunnels']:,} tunnels through {sus['proxy']} to one target "
            f"from one ingress IP: {sus['ok']:,} ok at {sus['tunnels_per_s']:,.0f}/s, "
            f"failures {sus['failures'] or 0} [{verdict}] "
            f"(CPU L{sus['cpu_pct']['load_s']:.0f} P{sus['cpu_pct']['proxy_s']:.0f}"
            f" O{sus['cpu_pct']['other_s']:.0f})"
        )


def main() -> int:
    args, settings = parse_args()
    settings, notes = preflight(args, settings)
    load_cpus, proxy_cpus, pin_notes = plan_cpus(settings.workers)
    tmp = Path(tempfile.mkdtemp(prefix="socksd-perf-"))
    started = time.monotonic()
    try:
        build_tools(tmp)
        digest = snapshot_socksd(tmp)
        against = tuple(snapshot_revision(tmp, rev) for rev in args.against)
        columns, skip_notes = make_columns(
            settings,
            tmp,
            args.python,
            proxy_cpus,
            args.floor,
            args.splice_relay,
            against,
            args.baselines,
            args.accounting_off,
        )
        notes += pin_notes + skip_notes
        if against and settings.namespaces == "shared":
            notes.append(
                "columns share one namespace, each starting among the TIME_WAIT sockets of "
                "the one before; --namespaces per-column gives each column its own"
            )
        notes.append(f"proxy logs (socksd: level info, tunnel_closed on) go to files in {tmp}")
        notes.append(f"socksd runs from a copy of socksd/ and workers/ taken at start: {tmp}/src")
        meta = {
            "settings": asdict(settings),
            "versions": versions(args.python, columns, digest, against),
            "sysctls": SYSCTLS,
            "columns": [asdict(c) for c in columns],
        }
        print("socksd perf:", json.dumps(meta["versions"]))
        print(f"settings: {json.dumps(meta['settings'])}")
        for note in notes:
            print(f"note: {note}")
        sys.stdout.flush()
        runs, sus = measure_all(tmp, settings, columns, load_cpus)
        summary = summarize(runs)
        # The baselines' ratios are on today's path: socksd's column of that path.
        ours = next((c.key for c in columns if c.path == DEFAULT_PATH), columns[0].key)
        ratio = ratios(summary["medians"], ours)
        print_table(columns, summary, ratio)
        paired = paired_ratios(runs, ours)
        print_paired(paired)
        by_round = round_ratios(runs, columns)
        by_path = path_ratios(runs, columns)
        if "rate" in settings.figures:
            print_rounds(runs, columns, by_round)
            if settings.paths != (DEFAULT_PATH,):
                print_paths(columns, summary, by_round, by_path)
        print_extras(columns, summary, sus, settings)
        elapsed = time.monotonic() - started
        print(f"total time {elapsed:.0f} s")
        if args.json:
            report = {
                **meta,
                "notes": notes,
                **summary,
                "ratios": ratio,
                "paired_ratios": paired,
                "round_ratios": by_round,
                "path_ratios": by_path,
                "sustained": sus,
                "runs": {
                    k: [{m: asdict(s) for m, s in r.items()} for r in v] for k, v in runs.items()
                },
                "elapsed_s": elapsed,
            }
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        if args.keep_logs:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
