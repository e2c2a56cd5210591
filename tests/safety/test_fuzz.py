"""Fuzzing the worker's SOCKS5 handshake over real sockets, with a bulk tunnel alongside.

Thousands of random and mutated handshakes (random bytes; valid SOCKS5 and SOCKS4/4a
greetings and requests with flipped bytes, cut short, with inflated length fields or
wrong versions; sent in random chunks, some then half-closed or reset) run against one
worker, many at a time, while a well-behaved client streams 8 MiB each way through an
echo target. Every timeout is short (handshake 2 s; connect, BIND and UDP idle 1 s), so
every connection must end by socksd's hand within the handshake timeout plus a margin;
one whose request succeeded is ended by the fuzz client's FIN, as a real client would.

Everything runs in a throw-away network namespace that has only `lo`: a mutated request
may name any IPv4/IPv6 address or any host name, and there that fails fast (no route,
no DNS server) instead of sending packets off the box. Cases come from a seeded RNG;
the seed is in every failure message (rerun with SOCKSD_FUZZ_SEED=<seed>).
"""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.integration.helpers import TIMEOUT, echo, encode_request
from tests.safety.conftest import (
    Target,
    children_of,
    connect_via,
    crash_lines,
    echo_roundtrip,
    fd_count,
    fd_kinds,
    start_time,
    steady_fd_count,
    wait_fd_count,
    worker_pid,
)

SEED = int(os.environ.get("SOCKSD_FUZZ_SEED", "0")) or random.randrange(1, 2**32)
CASES = 2500
PARALLEL = 128
HANDSHAKE = 2.0  # [timeouts] handshake
CONNECT = 1.0  # [timeouts] connect
# A fuzz connection must be over (EOF or RST from socksd) this long after it started:
# the handshake timeout plus scheduling slack on a loaded 2-core box.
MARGIN = 2.0
MAX_GAPS = 0.6  # total pauses between one case's chunks: ends before the handshake timeout
MAX_PAYLOAD = 32 * 1024  # below the relay's 64 KiB read: fuzz tunnels never go to splice
RUN_LIMIT = 60.0  # the whole fuzz run, as a last-resort bound
STREAM = 8 << 20
STREAM_CHUNK = 64 * 1024
STREAM_PAUSE = 0.04  # paced, so the stream overlaps most of the fuzz run

CONFIG = f"""\
listen = ["127.0.0.1:0"]
workers = 1
shutdown_timeout = 3.0
protocols = ["socks5", "socks4"]
[timeouts]
handshake = {HANDSHAKE}
connect = {CONNECT}
idle = 30.0
bind = {CONNECT}
udp_idle = {CONNECT}
"""


@dataclass(slots=True, eq=False)
class Case:
    """One fuzz connection: what to send, how, and what happened."""

    index: int
    kind: str
    chunks: list[bytes]
    gaps: list[float]  # pause before each chunk
    half_close: bool  # shutdown(SHUT_WR) after the last chunk
    abort: bool  # RST (SO_LINGER 0 close) after the last chunk
    sock: socket.socket | None = None
    state: str = "new"  # new -> connecting -> open -> done
    started: float = 0.0
    due: float = 0.0  # when the next chunk may go
    chunk: int = 0
    offset: int = 0
    sent_all: bool = False
    wr_closed: bool = False
    tunnel: bool = False  # socksd answered 05 00 then 05 00: a tunnel is up
    head: bytearray = field(default_factory=bytearray)  # first bytes socksd sent
    received: int = 0
    ended: float = 0.0
    how: str = ""  # eof, reset, client_abort, or a failure (hung, connect_..., ...)

    def describe(self) -> str:
        sent = b"".join(self.chunks)
        return (
            f"case {self.index} ({self.kind}, half_close={self.half_close}, "
            f"abort={self.abort}): sent {sent[:40].hex()}{'...' if len(sent) > 40 else ''} "
            f"({len(sent)} B in {len(self.chunks)} chunks), got {bytes(self.head[:24]).hex()} "
            f"({self.received} B), ended {self.how!r} after {self.ended - self.started:.2f}s"
        )


# -- case generation ------------------------------------------------------------------


class Generator:
    def __init__(self, rng: random.Random, echo_port: int, refused_port: int) -> None:
        self.rng = rng
        self.echo_port = echo_port
        self.refused_port = refused_port

    def greeting(self) -> bytes:
        rng = self.rng
        methods = [0, *rng.sample(range(1, 256), rng.choice([0, 0, 1, 2, 5]))]
        rng.shuffle(methods)
        return bytes([5, len(methods), *methods])

    def request(self) -> bytes:
        rng = self.rng
        host, port, cmd = rng.choice(
            [
                ("127.0.0.1", self.echo_port, 1),  # tunnel
                ("127.0.0.1", self.echo_port, 1),
                ("127.0.0.1", self.refused_port, 1),  # 0x05
                ("localhost", self.echo_port, 1),  # resolved from /etc/hosts
                ("::1", self.echo_port, 1),  # IPv6 target, IPv4 ingress: no egress
                ("no-such-host.invalid", 80, 1),  # no DNS in the namespace
                ("127.0.0.1", self.echo_port, 2),  # BIND: waits for that peer
                ("0.0.0.0", 0, 3),  # UDP ASSOCIATE: lives as long as this connection
            ]
        )
        return encode_request(host, port, cmd)

    def socks4(self) -> bytes:
        """A SOCKS4 or 4a CONNECT or BIND request (`protocols` enables SOCKS4)."""
        rng = self.rng
        command = rng.choice([1, 1, 2])
        port = rng.choice([self.echo_port, self.echo_port, self.refused_port])
        user = rng.choice([b"", b"u", bytes(rng.randrange(1, 256) for _ in range(12))])
        head = struct.pack("!BBH", 4, command, port)
        if rng.random() < 0.3:  # 4a: 0.0.0.x, then the name after the user id
            name = rng.choice([b"localhost", b"no-such-host.invalid"])
            return head + b"\x00\x00\x00\x07" + user + b"\x00" + name + b"\x00"
        return head + b"\x7f\x00\x00\x01" + user + b"\x00"

    def payload(self) -> bytes:
        return self.rng.randbytes(self.rng.choice([0, 0, 1, 17, 512, 4096, MAX_PAYLOAD]))

    def handshake(self) -> tuple[bytes, bytes]:
        """(greeting, request) of a valid no-auth SOCKS5 exchange."""
        return self.greeting(), self.request()

    def exchange(self) -> bytes:
        """All a valid client sends before its first payload: SOCKS5, sometimes SOCKS4."""
        if self.rng.random() < 0.2:
            return self.socks4()
        g, r = self.handshake()
        return g + r

    # Each kind returns the bytes to send.
    def k_random(self) -> bytes:
        data = self.rng.randbytes(self.rng.choice([1, 2, 3, 5, 10, 64, 300, 1500]))
        lead = self.rng.random()
        if lead < 0.3:
            return b"\x05" + data
        return b"\x04" + data if lead < 0.4 else data

    def k_valid(self) -> bytes:
        return self.exchange() + self.payload()

    def k_flip(self) -> bytes:
        rng = self.rng
        head = self.exchange()
        data = bytearray(head + self.payload())
        for _ in range(rng.choice([1, 1, 2, 3])):
            # Mostly the header bytes, where a change alters the parse.
            pos = rng.randrange(min(len(data), len(head) + 2))
            if rng.random() < 0.5:
                data[pos] ^= 1 << rng.randrange(8)
            else:
                data[pos] = rng.randrange(256)
        return bytes(data)

    def k_truncate(self) -> bytes:
        whole = self.exchange()
        return whole[: self.rng.randrange(len(whole))]

    def k_length(self) -> bytes:
        """A length field promising more bytes than will come (or a lot more)."""
        rng = self.rng
        g, r = self.handshake()
        choice = rng.randrange(3)
        if choice == 0:  # NMETHODS
            return bytes([5, rng.randrange(len(g) - 1, 256)]) + g[2:]
        if choice == 1:  # domain length
            name = b"localhost"
            return g + b"\x05\x01\x00\x03" + bytes([rng.randrange(10, 256)]) + name + b"\x00\x50"
        # A DOMAINNAME ATYP in front of an IPv4 address: its first octet is the length.
        return g + b"\x05\x01\x00\x03" + bytes([127, 0, 0, 1]) + struct.pack("!H", 80)

    def k_version(self) -> bytes:
        rng = self.rng
        g, r = self.handshake()
        bad = rng.choice([0, 1, 4, 6, 0x16, 0x47, 0xFF])
        where = rng.randrange(3)
        if where == 0:
            return bytes([bad]) + g[1:] + r
        if where == 1:
            return g + bytes([bad]) + r[1:]
        return b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" if bad & 1 else b"\x16\x03\x01\x02\x00\x01"

    def k_auth(self) -> bytes:
        """Username/password talk to a proxy that has no auth configured."""
        rng = self.rng
        sub = b"\x01\x05alice\x06secret"
        if rng.random() < 0.5:
            return b"\x05\x01\x02" + sub  # only 0x02 offered: 0xFF, then close
        return b"\x05\x02\x00\x02" + sub + self.request()  # 0x00 chosen: 0x01 is no version

    def k_blob(self) -> bytes:
        """More than the 64 KiB handshake buffer, sent as fast as socksd takes it."""
        rng = self.rng
        if rng.random() < 0.3:  # a SOCKS4 user id that never ends
            return struct.pack("!BBH", 4, 1, self.echo_port) + b"\x7f\x00\x00\x01" + b"u" * 70_000
        return b"\x05" + rng.randbytes(rng.randrange(70_000, 140_000))

    def k_empty(self) -> bytes:
        return b""

    KINDS: tuple[tuple[str, int], ...] = (
        ("random", 20),
        ("valid", 15),
        ("flip", 27),
        ("truncate", 9),
        ("length", 5),
        ("version", 12),
        ("auth", 6),
        ("blob", 3),
        ("empty", 3),
    )

    def case(self, index: int) -> Case:
        rng = self.rng
        names, weights = zip(*self.KINDS, strict=True)
        kind = rng.choices(names, weights)[0]
        data: bytes = getattr(self, f"k_{kind}")()
        chunks = self.chunk(data)
        gaps = [0.0] + [rng.choice([0.0, 0.0, 0.0, 0.001, 0.005, 0.02, 0.1]) for _ in chunks[1:]]
        total = sum(gaps)
        if total > MAX_GAPS:
            gaps = [g * MAX_GAPS / total for g in gaps]
        roll = rng.random()
        return Case(index, kind, chunks, gaps, half_close=roll < 0.25, abort=roll > 0.95)

    def chunk(self, data: bytes) -> list[bytes]:
        rng = self.rng
        if not data:
            return []
        if len(data) > 16 and rng.random() < 0.5:
            return [data]
        pieces = min(len(data), rng.choice([1, 2, 3, 5, 8, len(data) if len(data) <= 24 else 8]))
        cuts = sorted(rng.sample(range(1, len(data)), pieces - 1)) if pieces > 1 else []
        bounds = [0, *cuts, len(data)]
        return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# -- the driver ---------------------------------------------------------------------


class Fuzzer:
    """Runs cases `parallel` at a time over non-blocking sockets in one selector loop."""

    def __init__(
        self,
        cases: list[Case],
        make_socket: Callable[[], socket.socket],
        proxy: tuple[str, int],
        parallel: int,
    ) -> None:
        self.cases = cases
        self.make_socket = make_socket
        self.proxy = proxy
        self.parallel = parallel
        self.sel = selectors.DefaultSelector()
        self.active: set[Case] = set()

    def run(self, limit: float) -> None:
        pending = collections.deque(self.cases)
        stop_at = time.monotonic() + limit
        try:
            while pending or self.active:
                now = time.monotonic()
                if now > stop_at:
                    for case in list(self.active):
                        self._end(case, "hung_run_limit")
                    break
                while pending and len(self.active) < self.parallel:
                    self._start(pending.popleft())
                wake = min(self._wake(c) for c in self.active) if self.active else now
                for key, mask in self.sel.select(max(0.0, min(wake - now, 0.05))):
                    case = key.data
                    if case.state == "connecting":
                        self._connected(case)
                        continue
                    if mask & selectors.EVENT_READ:
                        self._read(case)
                    if case.state == "open" and mask & selectors.EVENT_WRITE:
                        self._write(case)
                now = time.monotonic()
                for case in list(self.active):
                    due = case.state == "open" and not case.sent_all and case.offset == 0
                    if due and case.due <= now:
                        self._write(case)
                    if case.state != "done" and now > case.started + HANDSHAKE + MARGIN:
                        self._end(case, "hung")
        finally:
            for case in list(self.active):
                self._end(case, "hung_driver_error")
            self.sel.close()

    def _wake(self, case: Case) -> float:
        deadline = case.started + HANDSHAKE + MARGIN
        if case.state == "open" and case.offset == 0 and not case.sent_all:
            return min(case.due, deadline)
        return deadline

    def _start(self, case: Case) -> None:
        sock = self.make_socket()
        sock.setblocking(False)
        case.sock = sock
        case.started = time.monotonic()
        case.state = "connecting"
        self.active.add(case)
        err = sock.connect_ex(self.proxy)
        if err not in (0, errno.EINPROGRESS):
            self._end(case, f"connect_{errno.errorcode.get(err, err)}")
            return
        self.sel.register(sock, selectors.EVENT_WRITE, case)

    def _connected(self, case: Case) -> None:
        assert case.sock is not None
        err = case.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._end(case, f"connect_{errno.errorcode.get(err, err)}")
            return
        case.state = "open"
        case.due = time.monotonic() + (case.gaps[0] if case.gaps else 0.0)
        self.sel.modify(case.sock, selectors.EVENT_READ, case)
        self._write(case)

    def _read(self, case: Case) -> None:
        assert case.sock is not None
        try:
            data = case.sock.recv(65536)
        except BlockingIOError:
            return
        except ConnectionResetError:
            self._end(case, "reset")
            return
        except OSError as exc:
            self._end(case, f"recv_{errno.errorcode.get(exc.errno or 0, exc.errno)}")
            return
        if not data:
            self._end(case, "eof")
            return
        case.received += len(data)
        if len(case.head) < 64:
            case.head += data[: 64 - len(case.head)]
        # Method selection 05 00, then a reply with REP 00: a tunnel to the echo target.
        # SOCKS5: method selection 05 00, then a reply with REP 00; SOCKS4: CD 0x5A. The
        # request succeeded: a CONNECT tunnel, a BIND waiting for its peer, a UDP
        # association; each ends when the client ends it, which _maybe_finish_tunnel does.
        if not case.tunnel and (
            case.head[:4] == b"\x05\x00\x05\x00" or case.head[:2] == b"\x00\x5a"
        ):
            case.tunnel = True
            self._maybe_finish_tunnel(case)

    def _write(self, case: Case) -> None:
        """Send what is due; after the last chunk: half-close, reset, or just wait."""
        sock = case.sock
        assert sock is not None
        if case.sent_all:
            return
        now = time.monotonic()
        while case.chunk < len(case.chunks):
            if case.offset == 0 and case.due > now:
                self._want_write(case, False)
                return
            data = case.chunks[case.chunk]
            try:
                sent = sock.send(data[case.offset :])
            except BlockingIOError:
                sent = 0
            except (BrokenPipeError, ConnectionResetError):
                self._end(case, "reset")  # socksd closed (and reset) while we sent
                return
            case.offset += sent
            if case.offset < len(data):
                self._want_write(case, True)
                return
            case.chunk += 1
            case.offset = 0
            if case.chunk < len(case.chunks):
                case.due = now + case.gaps[case.chunk]
        self._want_write(case, False)
        case.sent_all = True
        if case.abort:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._end(case, "client_abort")
            return
        if case.half_close:
            self._shut(case)
        self._maybe_finish_tunnel(case)

    def _maybe_finish_tunnel(self, case: Case) -> None:
        # A case whose request succeeded ends it like a client would: FIN. A CONNECT
        # tunnel then gets the echo target's FIN back through socksd; a BIND wait or a
        # UDP association ends on the client's FIN (or at `bind`/`udp_idle`, 1 s here).
        if case.tunnel and case.chunk >= len(case.chunks) and not case.wr_closed:
            self._shut(case)

    def _shut(self, case: Case) -> None:
        assert case.sock is not None
        case.wr_closed = True
        try:
            case.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already reset: the read side reports it

    def _want_write(self, case: Case, want: bool) -> None:
        assert case.sock is not None
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
        if self.sel.get_key(case.sock).events != events:
            self.sel.modify(case.sock, events, case)

    def _end(self, case: Case, how: str) -> None:
        if case.state == "done":
            return
        case.ended = time.monotonic()
        case.how = how
        sock = case.sock
        if sock is not None:
            try:
                self.sel.unregister(sock)
            except KeyError:
                pass
            if how.startswith("hung"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        case.state = "done"
        self.active.discard(case)


# -- the test -----------------------------------------------------------------------


def _stream_through(sock: socket.socket, result: dict[str, object]) -> None:
    """Paced 8 MiB up an echo tunnel, half-close, while a reader hashes what comes back."""
    data = random.Random(SEED).randbytes(STREAM)
    result["sent_sha"] = hashlib.sha256(data).hexdigest()
    sock.settimeout(TIMEOUT * 2)

    def read() -> None:
        h = hashlib.sha256()
        n = 0
        try:
            while chunk := sock.recv(256 * 1024):
                h.update(chunk)
                n += len(chunk)
        except OSError as exc:
            result["read_error"] = repr(exc)
        result["got_sha"], result["got"] = h.hexdigest(), n

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        view = memoryview(data)
        for i in range(0, STREAM, STREAM_CHUNK):
            sock.sendall(view[i : i + STREAM_CHUNK])
            time.sleep(STREAM_PAUSE)
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        result["send_error"] = repr(exc)
    reader.join(TIMEOUT * 3)
    result["done"] = not reader.is_alive()


def test_fuzzed_handshakes_leave_the_worker_healthy(netns, spawn):
    ns = netns("fz")
    echo_listener = ns.socket()
    echo_listener.bind(("127.0.0.1", 0))
    target = Target(echo_listener, echo)
    refused = ns.socket()
    refused.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
    try:
        proc = spawn(CONFIG, prefix=("ip", "netns", "exec", ns.name))
        worker = worker_pid(proc)
        born = start_time(worker)
        proxy = proc.address

        # Warm-up: one bulk echo tunnel, so the worker's splice pipe pool holds the two
        # pipes the stream will borrow and give back; then the fd baseline.
        with ns.socket() as warm:
            assert connect_via(warm, proxy, "127.0.0.1", target.port)[0] == 0
            echo_roundtrip(warm, 1 << 20)
        proc.wait_for("tunnel_closed", lambda e: e.get("reason") == "eof")
        baseline = steady_fd_count(worker)
        kinds_before = fd_kinds(worker)

        gen = Generator(random.Random(SEED), target.port, refused.getsockname()[1])
        cases = [gen.case(i) for i in range(CASES)]

        stream_sock = ns.socket()
        stream: dict[str, object] = {}
        assert connect_via(stream_sock, proxy, "127.0.0.1", target.port)[0] == 0
        streamer = threading.Thread(target=_stream_through, args=(stream_sock, stream))
        started = time.monotonic()
        streamer.start()
        try:
            Fuzzer(cases, ns.socket, proxy, PARALLEL).run(RUN_LIMIT)
        finally:
            streamer.join(TIMEOUT * 4)
            stream_sock.close()
        fuzz_s = time.monotonic() - started

        ctx = f"seed={SEED}"
        hows = collections.Counter(c.how for c in cases)
        bad = [c for c in cases if c.how not in ("eof", "reset", "client_abort")]
        assert not bad, f"{ctx}: {len(bad)} cases did not end by socksd's hand: " + "\n".join(
            c.describe() for c in bad[:10]
        )
        slowest = max(
            (c for c in cases if c.how != "client_abort"), key=lambda c: c.ended - c.started
        )
        assert slowest.ended - slowest.started <= HANDSHAKE + MARGIN, f"{ctx}: {slowest.describe()}"

        # The stream shared the worker with the fuzz and came back byte for byte.
        assert stream.get("done") and "send_error" not in stream and "read_error" not in stream, (
            f"{ctx}: stream {stream}"
        )
        assert stream["got"] == STREAM and stream["got_sha"] == stream["sent_sha"], (
            f"{ctx}: {stream}"
        )

        # Same worker process, no handler crashed.
        assert children_of(proc.proc.pid) == {worker}, f"{ctx}: worker replaced"
        assert start_time(worker) == born, f"{ctx}: worker pid reused by a new process"
        assert crash_lines(proc) == [], f"{ctx}: {crash_lines(proc)[:3]}"

        # The fuzz exercised the paths it is meant to: tunnels, refusals, timeouts.
        failed = collections.Counter(e["reason"] for e in proc.named("handshake_failed"))
        assert sum(c.tunnel for c in cases) >= 20, f"{ctx}: few tunnels opened"
        assert failed["handshake_timeout"] >= 20, f"{ctx}: {failed}"
        assert failed["bad_version"] >= 100, f"{ctx}: {failed}"

        # Every fd the run opened is closed again.
        after = wait_fd_count(worker, baseline)
        assert after == baseline, (
            f"{ctx}: worker fds {after} after the run, {baseline} before: "
            f"before={dict(kinds_before)} after={dict(fd_kinds(worker))}"
        )

        # And the worker still serves a new tunnel.
        with ns.socket() as last:
            assert connect_via(last, proxy, "127.0.0.1", target.port)[0] == 0
            echo_roundtrip(last, 1 << 20)
        print(
            f"\nfuzz seed={SEED}: {CASES} cases, {PARALLEL} at a time, {fuzz_s:.1f}s; "
            f"endings {dict(hows)}; tunnels {sum(c.tunnel for c in cases)}; "
            f"handshake_failed {dict(failed)}; slowest {slowest.ended - slowest.started:.2f}s; "
            f"fds {baseline}; fd count now {fd_count(worker)}"
        )
        # One closing line per session, never two (checked last: the other properties
        # are independent of it).
        ends = [e for e in proc.events if e.get("event") in ("tunnel_closed", "handshake_failed")]
        per_conn = collections.Counter(e["conn_id"] for e in ends)
        twice = [e for e in ends if per_conn[e["conn_id"]] > 1]
        assert not twice, f"{ctx}: sessions that logged their end twice: {twice[:6]}"
    finally:
        target.close()
        refused.close()
