"""Hostile clients, broken targets and resource exhaustion against one real worker.

Each test starts its own `python -m socksd` (`workers = 1`, so the worker's pid is
known) and talks to it over loopback only: slow-loris clients, a client that stops
reading, targets that reset, close or never answer, and a worker out of fds.
"""

from __future__ import annotations

import collections
import os
import selectors
import shutil
import socket
import statistics
import struct
import threading
import time

from tests.conftest import need
from tests.integration.helpers import (
    TIMEOUT,
    TargetServer,
    encode_request,
    open_tunnel,
    read_reply,
    recv_exact,
    unanswered_port,
)
from tests.safety.conftest import (
    children_of,
    cpu_seconds,
    crash_lines,
    echo_roundtrip,
    fd_count,
    fd_kinds,
    rss_bytes,
    start_time,
    steady_fd_count,
    wait_fd_count,
    worker_pid,
)

_LINGER_RST = struct.pack("ii", 1, 0)


def _config(handshake: float = 2.0, connect: float = 2.0, idle: float = 30.0) -> str:
    # A short shutdown_timeout: a test that fails with sessions open still stops cleanly.
    return (
        'listen = ["127.0.0.1:0"]\nworkers = 1\nshutdown_timeout = 3.0\n'
        f"[timeouts]\nhandshake = {handshake}\nconnect = {connect}\nidle = {idle}\n"
    )


def _client_port(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def _read_to_end(sock: socket.socket, limit: int = 1 << 20) -> tuple[bytes, str]:
    """Read until EOF or reset (at most `limit` bytes); return (bytes, "eof"|"reset")."""
    out = bytearray()
    while len(out) <= limit:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(out), "reset"
        if not chunk:
            return bytes(out), "eof"
        out += chunk
    raise AssertionError(f"more than {limit} bytes, no end")


# -- a. slow loris -------------------------------------------------------------------

SLOW_CLIENTS = 200
HANDSHAKE = 2.0
CUT_SLACK = 1.5


class SlowLoris:
    """`n` clients that each send one byte of a valid handshake per second."""

    def __init__(self, proxy: tuple[str, int], n: int, message: bytes) -> None:
        self.message = message
        self.socks: list[socket.socket] = []
        self.started: list[float] = []
        self.ended: list[float | None] = [None] * n
        self.how: list[str] = [""] * n
        self.ports: list[str] = []
        try:
            for _ in range(n):
                s = socket.create_connection(proxy, timeout=TIMEOUT)  # backlog 4096: instant
                self.started.append(time.monotonic())
                s.setblocking(False)
                self.socks.append(s)
                self.ports.append(_client_port(s))
        except BaseException:
            self.close()
            raise
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sent = [0] * len(self.socks)
        for i, s in enumerate(self.socks):
            sel.register(s, selectors.EVENT_READ, i)
        stop_at = time.monotonic() + HANDSHAKE + CUT_SLACK + 2.0
        try:
            while sel.get_map() and time.monotonic() < stop_at:
                now = time.monotonic()
                for i, s in enumerate(self.socks):
                    if self.ended[i] is not None or sent[i] >= len(self.message):
                        continue
                    if now >= self.started[i] + sent[i]:  # byte k at second k
                        try:
                            s.send(self.message[sent[i] : sent[i] + 1])
                            sent[i] += 1
                        except BlockingIOError:
                            pass
                        except OSError:
                            self._end(sel, i, "reset")  # socksd closed on us
                for key, _ in sel.select(0.02):
                    i = key.data
                    try:
                        data = self.socks[i].recv(64)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        self._end(sel, i, "reset")
                        continue
                    if not data:
                        self._end(sel, i, "eof")
                    # else: the method selection (05 00) once the greeting is complete
        finally:
            sel.close()

    def _end(self, sel: selectors.BaseSelector, i: int, how: str) -> None:
        if self.ended[i] is None:
            self.ended[i] = time.monotonic()
            self.how[i] = how
            sel.unregister(self.socks[i])

    def close(self) -> None:
        for s in self.socks:
            s.close()


def test_slowloris_is_cut_at_the_handshake_timeout_and_tunnels_stay_fast(spawn, echo_target):
    proc = spawn(_config(handshake=HANDSHAKE))
    worker = worker_pid(proc)
    message = b"\x05\x01\x00" + encode_request("127.0.0.1", echo_target.port)
    loris = SlowLoris(proc.address, SLOW_CLIENTS, message)
    latencies: list[float] = []
    try:
        loris.thread.start()
        # Well-behaved clients meanwhile: one tunnel every 0.1 s for as long as the
        # loris clients are held.
        until = loris.started[-1] + HANDSHAKE + 0.5
        for _ in range(40):
            if time.monotonic() > until:
                break
            t0 = time.monotonic()
            sock, (rep, _, _) = open_tunnel(proc.address, "127.0.0.1", echo_target.port)
            latencies.append(time.monotonic() - t0)
            with sock:
                assert rep == 0
                sock.sendall(b"ping" * 256)
                assert recv_exact(sock, 1024) == b"ping" * 256
            time.sleep(0.1)
        loris.thread.join(HANDSHAKE + CUT_SLACK + 4.0)
        assert not loris.thread.is_alive()
    finally:
        loris.close()

    held = [
        (end - start if end is not None else None)
        for start, end in zip(loris.started, loris.ended, strict=True)
    ]
    never = [i for i, h in enumerate(held) if h is None]
    assert not never, f"{len(never)} slow clients were never cut, e.g. {loris.ports[never[0]]}"
    durations = [h for h in held if h is not None]
    assert min(durations) >= HANDSHAKE - 0.1, f"cut early: {min(durations):.2f}s"
    assert max(durations) <= HANDSHAKE + CUT_SLACK, f"cut late: {max(durations):.2f}s"
    assert set(loris.how) <= {"eof", "reset"}

    ports = set(loris.ports)
    timeouts = proc.wait_count(
        "handshake_failed",
        SLOW_CLIENTS,
        lambda e: e.get("client") in ports and e.get("reason") == "handshake_timeout",
    )
    assert {e["client"] for e in timeouts} == ports
    assert len(timeouts) == SLOW_CLIENTS

    assert len(latencies) >= 10
    median = statistics.median(latencies)
    assert median < 0.1, f"tunnel setup median {median * 1000:.0f} ms while under slow loris"
    assert max(latencies) < 1.0, f"slowest tunnel setup {max(latencies):.2f}s"
    assert crash_lines(proc) == []
    assert children_of(proc.proc.pid) == {worker}
    print(
        f"\nslowloris: {SLOW_CLIENTS} cut after {min(durations):.2f}..{max(durations):.2f}s; "
        f"{len(latencies)} tunnels, setup median {median * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms"
    )


# -- b. slow reader -------------------------------------------------------------------

FIREHOSE = 256 << 20
RSS_BOUND = 8 << 20
STALL_WINDOW = 3.0


def test_slow_reader_stalls_its_tunnel_not_the_worker_or_its_memory(spawn, echo_target):
    progress = {"sent": 0}
    block = os.urandom(256 * 1024)

    def firehose(sock: socket.socket, peer: object) -> None:
        while progress["sent"] < FIREHOSE:
            sock.sendall(block)
            progress["sent"] += len(block)

    source = TargetServer(firehose)
    proc = spawn(_config())
    worker = worker_pid(proc)
    slow = None
    try:
        # Warm the worker up (allocator, splice pipes) with the same 4 MiB exchange the
        # test makes during the stall, then take the memory baseline.
        warm, (rep, _, _) = open_tunnel(proc.address, "127.0.0.1", echo_target.port)
        with warm:
            assert rep == 0
            echo_roundtrip(warm, 4 << 20)
        rss_before = rss_bytes(worker)

        slow, (rep, _, _) = open_tunnel(proc.address, "127.0.0.1", source.port)
        assert rep == 0
        # Never read from `slow`: wait until back-pressure has stopped the target.
        last, since = -1, time.monotonic()
        deadline = time.monotonic() + 15.0
        while time.monotonic() - since < 0.5:
            assert time.monotonic() < deadline, f"target never stalled: {progress}"
            if progress["sent"] != last:
                last, since = progress["sent"], time.monotonic()
            time.sleep(0.05)
        stalled_at = progress["sent"]

        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                samples.append(rss_bytes(worker))

        sampler = threading.Thread(target=sample, daemon=True)
        window_end = time.monotonic() + STALL_WINDOW
        sampler.start()
        try:
            other, (rep, _, _) = open_tunnel(proc.address, "127.0.0.1", echo_target.port)
            with other:
                assert rep == 0
                echo_roundtrip(other, 4 << 20)
            time.sleep(max(0.0, window_end - time.monotonic()))
        finally:
            stop.set()
            sampler.join(TIMEOUT)

        assert samples, "no RSS samples"
        growth = max(samples) - rss_before
        assert growth < RSS_BOUND, (
            f"worker RSS grew {growth / 2**20:.1f} MiB with one stalled tunnel "
            f"(target had sent {stalled_at / 2**20:.0f} MiB)"
        )
        assert progress["sent"] == stalled_at, "the stalled tunnel kept draining its target"
        assert stalled_at < 128 << 20, f"{stalled_at / 2**20:.0f} MiB left the target unread"
    finally:
        if slow is not None:
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            slow.close()
        source.close()
    closed = proc.wait_for("tunnel_closed", lambda e: e["target"].endswith(f":{source.port}"))
    assert closed["reason"].startswith("client_"), closed
    assert crash_lines(proc) == []
    assert children_of(proc.proc.pid) == {worker}
    print(
        f"\nslow reader: target stalled after {stalled_at / 2**20:.1f} MiB; worker RSS "
        f"{rss_before / 2**20:.1f} MiB before, max growth {growth / 2**20:.2f} MiB"
    )


def test_fast_writer_to_a_target_that_never_reads_stays_bounded(spawn):
    """The other direction: the client pushes as fast as it can, the target reads
    nothing. socksd stops reading the client once the target's buffers are full, so
    the client stalls and the worker's memory does not grow with what it pushes."""
    hold = threading.Event()

    def never_read(sock: socket.socket, peer: object) -> None:
        hold.wait(30)

    sink = TargetServer(never_read)
    proc = spawn(_config())
    worker = worker_pid(proc)
    pushed = {"n": 0}
    try:
        rss_before = rss_bytes(worker)
        sock, (rep, _, _) = open_tunnel(proc.address, "127.0.0.1", sink.port)
        assert rep == 0
        sock.setblocking(False)
        block = os.urandom(256 * 1024)
        last, since = -1, time.monotonic()
        deadline = time.monotonic() + 15.0
        while time.monotonic() - since < 0.5:  # until sending has stalled for 0.5 s
            assert time.monotonic() < deadline, f"the client never stalled: {pushed}"
            try:
                pushed["n"] += sock.send(block)
            except BlockingIOError:
                time.sleep(0.01)
            if pushed["n"] != last:
                last, since = pushed["n"], time.monotonic()
        growth = rss_bytes(worker) - rss_before
        assert pushed["n"] < 128 << 20, f"{pushed['n'] / 2**20:.0f} MiB went in unread"
        assert growth < RSS_BOUND, f"worker RSS grew {growth / 2**20:.1f} MiB"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        sock.close()
    finally:
        hold.set()
        sink.close()
    proc.wait_for("tunnel_closed", lambda e: e["target"].endswith(f":{sink.port}"))
    assert crash_lines(proc) == []


# -- c. broken targets ---------------------------------------------------------------

PREFIX = os.urandom(32 * 1024)  # under the relay's 64 KiB read: no splice involved


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # bound, never listening: connects get RST


def _reset_after_prefix(sock: socket.socket, peer: object) -> None:
    recv_exact(sock, 2)  # "go": the tunnel is up end to end
    sock.sendall(PREFIX)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()  # RST, no FIN (socketserver's own shutdown then fails quietly)


def _close_at_once(sock: socket.socket, peer: object) -> None:
    pass  # socketserver closes it: FIN right after accept


def test_broken_targets_get_the_right_replies_and_leak_no_fds(spawn, echo_target):
    proc = spawn(_config(connect=1.0))
    worker = worker_pid(proc)
    resetter = TargetServer(_reset_after_prefix)
    closer = TargetServer(_close_at_once)
    try:
        warm, (rep, _, _) = open_tunnel(proc.address, "127.0.0.1", echo_target.port)
        with warm:
            assert rep == 0
            echo_roundtrip(warm, 1024)
        proc.wait_for("tunnel_closed", lambda e: e["target"].endswith(f":{echo_target.port}"))
        baseline = steady_fd_count(worker)
        kinds_before = fd_kinds(worker)

        for _ in range(3):
            # Refused port: 0x05, then EOF.
            port = _refused_port()
            sock, (rep, _, _) = open_tunnel(proc.address, "127.0.0.1", port)
            with sock:
                assert rep == 0x05
                assert _read_to_end(sock) == (b"", "eof")
            line = proc.wait_for("tunnel_closed", lambda e, p=port: e["target"].endswith(f":{p}"))
            assert (line["reply"], line["reason"]) == (0x05, "econnrefused")

            # Accepts, then closes at once: a tunnel (0x00) that ends with EOF.
            sock, (rep, _, _) = open_tunnel(proc.address, "127.0.0.1", closer.port)
            client = _client_port(sock)
            with sock:
                assert rep == 0
                assert _read_to_end(sock) == (b"", "eof")
            line = proc.wait_for("tunnel_closed", lambda e, c=client: e["client"] == c)
            assert (line["reply"], line["reason"]) == (0, "eof")
            assert (line["bytes_up"], line["bytes_down"]) == (0, 0)

            # Resets mid-stream: every byte sent before the RST arrives, then EOF or RST.
            sock, (rep, _, _) = open_tunnel(proc.address, "127.0.0.1", resetter.port)
            client = _client_port(sock)
            with sock:
                assert rep == 0
                sock.sendall(b"go")
                got, how = _read_to_end(sock)
            assert got == PREFIX, f"{len(got)} of {len(PREFIX)} bytes before the {how}"
            line = proc.wait_for("tunnel_closed", lambda e, c=client: e["client"] == c)
            assert line["reason"].startswith("upstream_"), line
            assert (line["bytes_up"], line["bytes_down"]) == (2, len(PREFIX)), line

        # Never answers: a listener whose accept queue is full drops SYNs, so the
        # connect hangs until socksd's connect timeout (1 s): 0x06.
        with unanswered_port() as port:
            for _ in range(2):
                t0 = time.monotonic()
                sock, (rep, _, _) = open_tunnel(proc.address, "127.0.0.1", port)
                with sock:
                    assert rep == 0x06
                    assert 0.9 <= time.monotonic() - t0 < 3.0
                    assert _read_to_end(sock) == (b"", "eof")
        timeouts = proc.wait_count(
            "tunnel_closed", 2, lambda e: e.get("reason") == "connect_timeout"
        )
        assert {e["reply"] for e in timeouts} == {0x06}

        after = wait_fd_count(worker, baseline)
        assert after == baseline, (
            f"worker fds {after}, {baseline} before: "
            f"before={dict(kinds_before)} after={dict(fd_kinds(worker))}"
        )
        assert crash_lines(proc) == []
        assert children_of(proc.proc.pid) == {worker}
    finally:
        resetter.close()
        closer.close()


def test_client_reset_after_a_failure_reply_is_logged_once(spawn, echo_target):
    """A client that resets after reading a failure reply and socksd's FIN (while socksd
    waits for the client's FIN) ends one session: exactly one closing log line
    (`tunnel_closed` or `handshake_failed`), not a second `handshake_failed`."""
    proc = spawn(_config())
    greeting = b"\x05\x01\x00"
    failures = [
        # (what the client sends, reply length, the reply's code byte, its offset)
        (greeting + encode_request("127.0.0.1", _refused_port()), 12, 0x05, 3),
        (greeting + encode_request("127.0.0.1", echo_target.port, cmd=9), 12, 0x07, 3),
        (b"\x05\x01\x02", 2, 0xFF, 1),  # only user/pass offered: X'FF'
        (greeting + b"\x05\x01\x00\x09" + b"\x00" * 6, 12, 0x08, 3),  # unknown ATYP
    ]
    clients: set[str] = set()
    for data, size, code, at in failures:
        for _ in range(3):
            s = socket.create_connection(proc.address, timeout=TIMEOUT)
            s.sendall(data)
            assert recv_exact(s, size)[at] == code
            # socksd's FIN: it now waits for ours (DRAINING), and gets an RST instead.
            assert s.recv(1) == b""
            clients.add(_client_port(s))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            s.close()

    def ends() -> list[dict[str, object]]:
        return [
            e
            for e in list(proc.events)
            if e.get("client") in clients
            and e.get("event") in ("tunnel_closed", "handshake_failed")
        ]

    deadline = time.monotonic() + TIMEOUT
    while {e["client"] for e in ends()} != clients:
        assert time.monotonic() < deadline, "some sessions never logged their end"
        time.sleep(0.02)
    time.sleep(0.3)  # a second line, if any, comes right after the reset
    lines = ends()
    per_client = collections.Counter(e["client"] for e in lines)
    twice = [e for e in lines if per_client[e["client"]] > 1]
    assert not twice, (
        f"{sum(n > 1 for n in per_client.values())} of {len(clients)} sessions logged a "
        f"second end after their failure reply, e.g. {twice[:2]}"
    )


def test_client_gone_while_bind_waits_ends_the_wait(spawn):
    """A BIND client that sends early payload (for the peer) and then its FIN while
    socksd waits for the peer: the wait ends with the client (a failure reply, then
    EOF, listener closed), not `timeouts.bind` later."""
    proc = spawn(_config() + "bind = 30.0\n")  # appended to [timeouts]
    worker = worker_pid(proc)
    baseline = steady_fd_count(worker)
    s = socket.create_connection(proc.address, timeout=TIMEOUT)
    client = _client_port(s)
    try:
        s.sendall(b"\x05\x01\x00" + encode_request("127.0.0.1", 0, cmd=2))
        assert recv_exact(s, 2) == b"\x05\x00"
        assert read_reply(s)[0] == 0  # the first BIND reply: listening
        s.sendall(b"early payload")
        time.sleep(0.1)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(3.0)
        try:
            rest, how = _read_to_end(s)
        except TimeoutError:
            raise AssertionError(
                f"client FIN unnoticed for 3 s while BIND waited (worker fds "
                f"{fd_count(worker)}, {baseline} before): the wait lasts timeouts.bind"
            ) from None
        assert rest[:2] == b"\x05\x01" and how == "eof", (rest, how)
    finally:
        s.close()
    line = proc.wait_for("tunnel_closed", lambda e: e.get("client") == client, timeout=3.0)
    assert line["reason"] == "client_closed", line
    assert wait_fd_count(worker, baseline, timeout=3.0) == baseline


# -- d. out of file descriptors ------------------------------------------------------

NOFILE = 64
HELD = 120
CPU_WINDOW = 2.0
CPU_SHARE = 0.3


def test_fd_exhaustion_pauses_accept_without_spinning_and_recovers(spawn, echo_target):
    need(shutil.which("prlimit") is not None, "prlimit (util-linux) is not installed")
    proc = spawn(
        _config(handshake=60.0),  # held clients must outlive the test
        prefix=("prlimit", f"--nofile={NOFILE}:{NOFILE}"),
    )
    worker = worker_pid(proc)
    born = start_time(worker)
    with open(f"/proc/{worker}/limits") as f:
        limit = next(line for line in f if line.startswith("Max open files")).split()[3:5]
    assert limit == [str(NOFILE)] * 2, limit

    established, (rep, _, _) = open_tunnel(proc.address, "127.0.0.1", echo_target.port)
    held: list[socket.socket] = []
    try:
        assert rep == 0
        # More idle mid-handshake clients than the worker has fds: the kernel completes
        # every TCP handshake (backlog 4096); the worker accepts until EMFILE.
        for _ in range(HELD):
            s = socket.create_connection(proc.address, timeout=TIMEOUT)
            held.append(s)
            s.sendall(b"\x05\x01")  # half a greeting
        paused = proc.wait_for("accept_paused")
        assert paused["errno"] in ("emfile", "enfile"), paused
        assert fd_count(worker) >= NOFILE - 4

        # Paused, not spinning on the readable listener.
        time.sleep(0.3)
        cpu0, t0 = cpu_seconds(worker), time.monotonic()
        time.sleep(CPU_WINDOW)
        share = (cpu_seconds(worker) - cpu0) / (time.monotonic() - t0)
        assert share < CPU_SHARE, f"worker used {share:.0%} of a core while out of fds"

        # A tunnel opened before the exhaustion still works (its bulk read cannot get a
        # splice pipe now: the relay must fall back to copying).
        payload = os.urandom(256 * 1024)
        sender = threading.Thread(target=established.sendall, args=(payload,), daemon=True)
        sender.start()
        assert recv_exact(established, len(payload)) == payload
        sender.join(TIMEOUT)
    finally:
        for s in held:
            s.close()
        established.close()

    # Recovery by itself: the closed clients free their fds, accepting resumes.
    deadline = time.monotonic() + 10.0
    while fd_count(worker) > NOFILE // 2:
        assert time.monotonic() < deadline, f"worker still holds {fd_count(worker)} fds"
        time.sleep(0.05)
    sock, (rep, _, _) = open_tunnel(proc.address, "127.0.0.1", echo_target.port)
    with sock:
        assert rep == 0
        echo_roundtrip(sock, 1 << 20)
    assert children_of(proc.proc.pid) == {worker} and start_time(worker) == born
    assert crash_lines(proc) == []
    print(
        f"\nfd exhaustion: {len(proc.named('accept_paused'))} accept_paused events; "
        f"worker CPU while paused {share:.1%} of a core"
    )
