"""The kernel's egress port-binding contract that socksd's egress path is built on.

Owns: one raw-socket test per fact in shared/notes/port-binding.md ("the note"): every
row of section 1's table, the model of section 2, the TIME_WAIT and IP_LOCAL_PORT_RANGE
facts of section 3, the bind/connect errnos of section 4, and one fact beyond the note
(explicit-port connect over TIME_WAIT). Each runs in a fresh network namespace whose
ephemeral range is exactly P = 2 ports (50000-50001), so exhaustion takes two sockets.
Must not: send a packet outside the test's own namespace (all addresses are 127/8 or
fd00:5::/64 on the namespace's lo), wait for TIME_WAIT's 60 s, or import socksd: when
one of these fails, the kernel (or the note) is wrong, not socksd.

Layout inside each namespace: local (egress) IPs A, B; targets T3:9003 and T4:9004
listening on ports outside the ephemeral range. `tcp_tw_reuse` is set to 0 unless a test
says otherwise, because the default 2 counts every 127/8 address as loopback.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import need
from tests.netns import NetNS

PORT_LO, PORT_HI = 50000, 50001
P = PORT_HI - PORT_LO + 1
ROUTE_SRC = "127.0.0.1"  # lo's primary address: the route's preferred source for 127/8
A, B = "127.0.0.2", "127.0.0.3"
T3 = ("127.0.0.33", 9003)
T4 = ("127.0.0.44", 9004)
T3_OTHER_PORT = ("127.0.0.33", 9005)
A6 = "fd00:5::2"
T3_6 = ("fd00:5::33", 9003)
T4_6 = ("fd00:5::44", 9004)
UNCONFIGURED_IP = "192.0.2.1"  # TEST-NET-1, on no interface here; only ever bind()ed

TW_REUSE_DELAY_MS = 100
TIMEOUT = 2.0  # seconds; any single wait in this file
POLL = 0.005
MAX_POLLS = int(TIMEOUT / POLL) + 1
TCP_TIME_WAIT = 0x06  # include/net/tcp_states.h
USER_HZ = 100  # /proc/net/tcp reports timers in clock_t
IP_LOCAL_PORT_RANGE = getattr(socket, "IP_LOCAL_PORT_RANGE", 51)  # Linux 6.3+, Python 3.12+

Addr = tuple[str, int]


def _addr(sockaddr: tuple[object, ...]) -> Addr:
    host, port = sockaddr[0], sockaddr[1]
    assert isinstance(host, str) and isinstance(port, int)
    return host, port


@dataclass(frozen=True, slots=True)
class TcpRow:
    """One line of /proc/net/tcp{,6}."""

    local: Addr
    remote: Addr
    state: int
    timer_s: float


def _hex_addr(field: str) -> Addr:
    host_hex, port_hex = field.split(":")
    # Each 32-bit word of the network-order address is printed as a host-order integer.
    packed = b"".join(
        int(host_hex[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(host_hex), 8)
    )
    family = socket.AF_INET if len(packed) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, packed), int(port_hex, 16)


class Lab:
    """A namespace with the note's layout: 2-port range, A/B local, T3/T4 listening."""

    def __init__(self, ns: NetNS) -> None:
        self.ns = ns
        self._accepted: list[socket.socket] = []
        self._pending: dict[Addr, socket.socket] = {}
        self.listeners: dict[Addr, socket.socket] = {}
        ns.sysctl("net.ipv4.ip_local_port_range", f"{PORT_LO} {PORT_HI}")
        ns.sysctl("net.ipv4.tcp_timestamps", 1)
        ns.sysctl("net.ipv4.tcp_tw_reuse", 0)
        for target in (T3, T4):
            self.listen(target)

    def close(self) -> None:
        for sock in self._accepted:
            sock.close()

    # -- setup ------------------------------------------------------------------------

    def listen(self, target: Addr, family: int = socket.AF_INET) -> socket.socket:
        sock = self.ns.socket(family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(target)
        sock.listen(64)
        sock.settimeout(TIMEOUT)
        self.listeners[target] = sock
        return sock

    def set_tw_reuse(self, value: int, delay_ms: int = TW_REUSE_DELAY_MS) -> None:
        """Set tcp_tw_reuse and a short tcp_tw_reuse_delay (needs the sysctl, Linux 6.13+)."""
        try:
            self.ns.read_sysctl("net.ipv4.tcp_tw_reuse_delay")
        except FileNotFoundError:
            need(False, "kernel has no net.ipv4.tcp_tw_reuse_delay (added in Linux 6.13)")
        self.ns.sysctl("net.ipv4.tcp_tw_reuse_delay", delay_ms)
        self.ns.sysctl("net.ipv4.tcp_tw_reuse", value)

    # -- egress sockets ---------------------------------------------------------------

    def egress(
        self,
        src: str | None = None,
        port: int = 0,
        *,
        no_port: bool = False,
        reuseaddr: bool = False,
        family: int = socket.AF_INET,
    ) -> socket.socket:
        """A non-blocking TCP socket, optionally NO_PORT / SO_REUSEADDR, bound if `src`."""
        sock = self.ns.socket(family)
        sock.setblocking(False)
        if reuseaddr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if no_port:
            # Level IPPROTO_IP even on AF_INET6: ipv6_setsockopt() hands SOL_IP to IPv4.
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
        if src is not None:
            sock.bind((src, port))
        return sock

    def open(
        self,
        target: Addr,
        src: str | None = None,
        *,
        no_port: bool = False,
        reuseaddr: bool = False,
        family: int = socket.AF_INET,
    ) -> socket.socket:
        """An established egress connection; fails the test if it cannot be made."""
        sock = self.egress(src, no_port=no_port, reuseaddr=reuseaddr, family=family)
        err = connect(sock, target)
        assert err == 0, f"connect({src} -> {target}) failed: {errno.errorcode.get(err, err)}"
        return sock

    # -- the target's side ------------------------------------------------------------

    def peer_of(self, sock: socket.socket) -> socket.socket:
        """The target's accepted socket for `sock`'s connection."""
        key = _addr(sock.getsockname())
        listener = self.listeners[_addr(sock.getpeername())]
        for _ in range(256):
            if key in self._pending:
                return self._pending.pop(key)
            conn, peer = listener.accept()  # TIMEOUT bounds the wait
            conn.settimeout(TIMEOUT)
            self._accepted.append(conn)
            self._pending[_addr(peer)] = conn
        raise AssertionError(f"no accepted connection from {key}")

    def close_proxy_first(
        self, sock: socket.socket, *, confirm: bool = True
    ) -> tuple[Addr, Addr, float]:
        """Close `sock`, then its peer: the proxy side ends in TIME_WAIT.

        Args:
            sock: an established egress socket.
            confirm: wait until /proc/net/tcp shows the TIME_WAIT entry (a subprocess,
                ~10 ms); a caller racing a timer passes False and checks afterwards.

        Returns:
            (local, remote, t0): the quad now in TIME_WAIT, and `time.monotonic()` taken
            just before the close, i.e. before the kernel's TIME_WAIT entry stamp.
        """
        local, remote = _addr(sock.getsockname()), _addr(sock.getpeername())
        peer = self.peer_of(sock)
        t0 = time.monotonic()
        sock.close()
        assert peer.recv(1) == b"", "target did not see the proxy's FIN"
        peer.close()  # on loopback the FIN, and so TIME_WAIT, is processed in this call
        if confirm:
            self.wait_row(local, remote)
        return local, remote, t0

    # -- observation ------------------------------------------------------------------

    def tcp_rows(self) -> list[TcpRow]:
        text = self.ns.run(
            ["cat", "/proc/net/tcp", "/proc/net/tcp6"], capture_output=True, text=True
        ).stdout
        rows = []
        for line in text.splitlines():
            fields = line.split()
            if not fields or not fields[0].endswith(":"):
                continue  # a header
            timer_hex = fields[5].split(":")[1]
            rows.append(
                TcpRow(
                    local=_hex_addr(fields[1]),
                    remote=_hex_addr(fields[2]),
                    state=int(fields[3], 16),
                    timer_s=int(timer_hex, 16) / USER_HZ,
                )
            )
        return rows

    def wait_row(self, local: Addr, remote: Addr, state: int = TCP_TIME_WAIT) -> TcpRow:
        """Wait (bounded) until the quad (local, remote) shows `state`; return its row."""
        deadline = time.monotonic() + TIMEOUT
        for _ in range(MAX_POLLS):
            for row in self.tcp_rows():
                if row.local == local and row.remote == remote and row.state == state:
                    return row
            if time.monotonic() > deadline:
                break
            time.sleep(POLL)
        raise AssertionError(f"{local} -> {remote} never reached state {state:#x}")

    def wait_gone(self, local: Addr, remote: Addr) -> None:
        """Wait (bounded) until no socket of any state holds the quad (local, remote)."""
        deadline = time.monotonic() + TIMEOUT
        for _ in range(MAX_POLLS):
            if not any(r.local == local and r.remote == remote for r in self.tcp_rows()):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(POLL)
        raise AssertionError(f"{local} -> {remote} still held after {TIMEOUT} s")

    def active_opens(self) -> int:
        """Tcp ActiveOpens: counted by tcp_connect(), i.e. once per SYN-sending connect."""
        text = self.ns.run(["cat", "/proc/net/snmp"], capture_output=True, text=True).stdout
        header, values = (line.split() for line in text.splitlines() if line.startswith("Tcp:"))
        return int(values[header.index("ActiveOpens")])


@pytest.fixture
def lab(netns: Callable[[str], NetNS]) -> Iterator[Lab]:
    lab = Lab(netns("kc"))
    try:
        yield lab
    finally:
        lab.close()


def connect_now(sock: socket.socket, target: Addr) -> int:
    """Start a non-blocking connect; the errno it returns *synchronously* (0, EINPROGRESS...)."""
    assert sock.gettimeout() == 0.0, "connect_now() needs a non-blocking socket"
    return sock.connect_ex(target)


def connect(sock: socket.socket, target: Addr) -> int:
    """Non-blocking connect, then wait for the handshake; 0 or the final errno."""
    err = connect_now(sock, target)
    if err != errno.EINPROGRESS:
        return err
    _, writable, _ = select.select([], [sock], [], TIMEOUT)
    assert writable, f"connect to {target} neither completed nor failed in {TIMEOUT} s"
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def assert_connect_fails_now(sock: socket.socket, target: Addr, err: int) -> None:
    got = connect_now(sock, target)
    assert got == err, (
        f"connect: expected {errno.errorcode[err]}, got {errno.errorcode.get(got, got)}"
    )


def assert_bind_fails(sock: socket.socket, addr: Addr, err: int) -> None:
    with pytest.raises(OSError) as exc_info:
        sock.bind(addr)
    assert exc_info.value.errno == err, exc_info.value


def wait_until_connects(
    target: Addr, make: Callable[[], socket.socket]
) -> tuple[socket.socket, float]:
    """Retry `make()` + connect every few ms until it works; returns (socket, time of success)."""
    deadline = time.monotonic() + TIMEOUT
    for _ in range(MAX_POLLS):
        sock = make()
        err = connect(sock, target)
        if err == 0:
            return sock, time.monotonic()
        sock.close()
        assert err == errno.EADDRNOTAVAIL, errno.errorcode.get(err, err)
        if time.monotonic() > deadline:
            break
        time.sleep(POLL)
    raise AssertionError(f"connect to {target} still EADDRNOTAVAIL after {TIMEOUT} s")


# --- Section 1: the blog's examples against the kernel -------------------------------


def test_raw_connect_uses_the_route_source_ip_so_only_p_succeed(lab: Lab) -> None:
    """Note §1 row 1, §2 "Source IP": an unbound connect() takes the route's preferred
    source (one IP, not "any free IP"), so only P = 2 of 4 connects to T3 succeed; the
    3rd and 4th fail at connect with EADDRNOTAVAIL."""
    first = [lab.open(T3) for _ in range(P)]
    assert {_addr(s.getsockname())[0] for s in first} == {ROUTE_SRC}
    assert sorted(_addr(s.getsockname())[1] for s in first) == [PORT_LO, PORT_HI]
    for _ in range(2):
        assert_connect_fails_now(lab.egress(), T3, errno.EADDRNOTAVAIL)


def test_raw_connect_to_a_new_target_succeeds_when_the_first_is_full(lab: Lab) -> None:
    """Note §1 row 2: after T3 has used up both ports, connect(T4) succeeds: a new
    4-tuple may reuse a source port already connected elsewhere."""
    to_t3 = [lab.open(T3) for _ in range(P)]
    assert_connect_fails_now(lab.egress(), T3, errno.EADDRNOTAVAIL)
    to_t4 = lab.open(T4)
    assert _addr(to_t4.getsockname())[1] in {_addr(s.getsockname())[1] for s in to_t3}


def test_so_reuseaddr_does_not_let_connect_reuse_a_time_wait_quad(lab: Lab) -> None:
    """Note §1 row 3: close one connection (proxy side first, so it sits in TIME_WAIT),
    set SO_REUSEADDR, connect(T3): fails EADDRNOTAVAIL with tcp_tw_reuse=0, also well
    after tcp_tw_reuse_delay; connect() never looks at SO_REUSEADDR. Control: switching
    tcp_tw_reuse to 1 (and nothing else) makes the same connect work."""
    lab.set_tw_reuse(0)
    conns = [lab.open(T3) for _ in range(P)]
    lab.close_proxy_first(conns[0])
    assert_connect_fails_now(lab.egress(reuseaddr=True), T3, errno.EADDRNOTAVAIL)
    time.sleep(3 * TW_REUSE_DELAY_MS / 1000)
    assert_connect_fails_now(lab.egress(reuseaddr=True), T3, errno.EADDRNOTAVAIL)
    lab.ns.sysctl("net.ipv4.tcp_tw_reuse", 1)
    lab.open(T3, reuseaddr=True)


def test_explicit_bind_ip_port_four_times_all_succeed(lab: Lab) -> None:
    """Note §1 row 4: bind(A|B, 50000|50001) + connect(T3): all four succeed (four
    different 4-tuples, each port explicitly owned per IP)."""
    for src in (A, B):
        for port in (PORT_LO, PORT_HI):
            sock = lab.egress(src, port)
            assert connect(sock, T3) == 0
            assert _addr(sock.getsockname()) == (src, port)


def test_fifth_bind_port_zero_fails_at_bind_with_eaddrinuse(lab: Lab) -> None:
    """Note §1 row 5: after the four explicit binds, bind(A, 0) fails at bind() with
    EADDRINUSE, before any target is named."""
    explicit = [lab.egress(src, port) for src in (A, B) for port in (PORT_LO, PORT_HI)]
    for sock in explicit:
        assert connect(sock, T3) == 0
    assert_bind_fails(lab.egress(), (A, 0), errno.EADDRINUSE)


def test_mix_and_match_raw_connect_skips_explicitly_bound_ports(lab: Lab) -> None:
    """Note §1 row 6 ("mix and match") and §2: a port held by an explicit bind() on *any*
    IP is skipped by every connect()-time port choice, so after binds on A and B a raw
    connect(T4) (source 127.0.0.1, a third IP) fails EADDRNOTAVAIL."""
    for src in (A, B):
        for port in (PORT_LO, PORT_HI):
            assert connect(lab.egress(src, port), T3) == 0
    assert_connect_fails_now(lab.egress(), T4, errno.EADDRNOTAVAIL)


def test_no_port_connect_after_explicit_binds_fails_at_connect(lab: Lab) -> None:
    """Note §1 row 7: IP_BIND_ADDRESS_NO_PORT + bind(A, 0) + connect(T4) after the
    explicit binds: bind succeeds (no port taken yet), connect fails EADDRNOTAVAIL
    because connect-time choice skips explicitly bound ports."""
    for src in (A, B):
        for port in (PORT_LO, PORT_HI):
            assert connect(lab.egress(src, port), T3) == 0
    sock = lab.egress(A, no_port=True)  # bind() inside: must not raise
    assert _addr(sock.getsockname()) == (A, 0)
    assert_connect_fails_now(sock, T4, errno.EADDRNOTAVAIL)


def test_no_port_everywhere_lets_ports_be_shared_across_targets(lab: Lab) -> None:
    """Note §1 row 7 (second half): when *every* egress socket uses NO_PORT, the same
    four A/B -> T3 connections leave both ports usable for A -> T4."""
    for src in (A, B):
        for _ in range(P):
            lab.open(T3, src, no_port=True)
    for _ in range(P):
        lab.open(T4, A, no_port=True)


def test_no_port_exhaustion_fails_at_connect_synchronously_before_any_packet(lab: Lab) -> None:
    """Note §1 row 8, §2 NO_PORT bullet: with both A -> T3 quads in use, NO_PORT +
    bind(A, 0) succeeds and a *non-blocking* connect(T3) returns EADDRNOTAVAIL from the
    call itself (not EINPROGRESS, not via SO_ERROR), and no SYN is sent (Tcp
    ActiveOpens unchanged)."""
    for _ in range(P):
        lab.open(T3, A, no_port=True)
    sock = lab.egress(A, no_port=True)
    opens = lab.active_opens()
    assert_connect_fails_now(sock, T3, errno.EADDRNOTAVAIL)
    assert lab.active_opens() == opens


def test_no_port_is_ignored_when_port_is_nonzero(lab: Lab) -> None:
    """Note §1 row 9, §2 bind(ip, p != 0) bullet: NO_PORT + bind(A, 50000) takes the port
    at bind() (getsockname shows it) and so, with that port's A -> T3 quad in TIME_WAIT
    from a socket without SO_REUSEADDR, the blog's SO_REUSEADDR + NO_PORT + bind(A, 50000)
    fails *at bind* with EADDRINUSE. With port 0 the bind succeeds and connect fails
    EADDRNOTAVAIL while the TIME_WAIT quad is not reusable (tcp_tw_reuse=0)."""
    probe = lab.egress(A, PORT_LO, no_port=True)
    assert _addr(probe.getsockname()) == (A, PORT_LO)
    probe.close()

    conns = [lab.open(T3, A, no_port=True) for _ in range(P)]
    (_, tw_port), _, _ = lab.close_proxy_first(conns[0])
    assert_bind_fails(lab.egress(no_port=True, reuseaddr=True), (A, tw_port), errno.EADDRINUSE)
    sock = lab.egress(A, no_port=True, reuseaddr=True)
    assert_connect_fails_now(sock, T3, errno.EADDRNOTAVAIL)


# --- Section 2: the model -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Owner:
    kind: str  # "bound", "connected", "listening" or "time_wait"
    ip: str
    reuseaddr: bool


BIND_CASES = [
    # (existing owner of port 50000, new socket sets SO_REUSEADDR, bind succeeds)
    (Owner("bound", A, reuseaddr=False), True, False),
    (Owner("bound", A, reuseaddr=True), False, False),
    (Owner("bound", A, reuseaddr=True), True, True),
    (Owner("bound", "0.0.0.0", reuseaddr=False), True, False),
    (Owner("bound", "0.0.0.0", reuseaddr=True), True, True),
    (Owner("connected", A, reuseaddr=False), True, False),
    (Owner("connected", A, reuseaddr=True), True, True),
    (Owner("listening", A, reuseaddr=True), True, False),
    (Owner("time_wait", A, reuseaddr=False), True, False),
    (Owner("time_wait", A, reuseaddr=True), True, True),
    (Owner("bound", B, reuseaddr=False), False, True),  # other IP: no conflict at all
]


@pytest.mark.parametrize(
    ("owner", "new_reuseaddr", "ok"),
    BIND_CASES,
    ids=[
        f"{o.kind}-{o.ip}-owner{'+' if o.reuseaddr else '-'}reuse-new{'+' if r else '-'}reuse"
        for o, r, _ in BIND_CASES
    ],
)
def test_bind_nonzero_port_conflicts_unless_all_owners_set_reuseaddr(
    lab: Lab, owner: Owner, new_reuseaddr: bool, ok: bool
) -> None:
    """Note §2, bind(ip, p != 0): EADDRINUSE if any socket (TIME_WAIT included) owns
    (ip or wildcard, p), unless all of them set SO_REUSEADDR and none listens."""
    held = lab.egress(owner.ip, PORT_LO, reuseaddr=owner.reuseaddr)
    if owner.kind == "listening":
        held.listen(1)
    elif owner.kind in ("connected", "time_wait"):
        assert connect(held, T3) == 0
        if owner.kind == "time_wait":
            lab.close_proxy_first(held)
    new = lab.egress(reuseaddr=new_reuseaddr)
    if ok:
        new.bind((A, PORT_LO))
        assert _addr(new.getsockname()) == (A, PORT_LO)
    else:
        assert_bind_fails(new, (A, PORT_LO), errno.EADDRINUSE)


def test_bind_port_zero_capacity_is_p_per_ip_across_targets(lab: Lab) -> None:
    """Note §2, bind(ip, 0) without NO_PORT: the kernel picks a port nobody owns on that
    IP, so A gets P ports in total whatever the targets (one to T3, one to T4), the next
    bind(A, 0) fails EADDRINUSE, and B still has its own P."""
    to_t3 = lab.egress(A, 0)
    to_t4 = lab.egress(A, 0)
    assert connect(to_t3, T3) == 0
    assert connect(to_t4, T4) == 0
    assert {_addr(to_t3.getsockname())[1], _addr(to_t4.getsockname())[1]} == {PORT_LO, PORT_HI}
    assert_bind_fails(lab.egress(), (A, 0), errno.EADDRINUSE)
    for _ in range(P):
        assert connect(lab.egress(B, 0), T3) == 0


def test_bind_port_zero_keeps_a_time_wait_port_blocked_whatever_tw_reuse(lab: Lab) -> None:
    """Note §2, bind(ip, 0) bullet: a closed port stays blocked ~60 s whatever
    tcp_tw_reuse says: with tcp_tw_reuse=1 and the delay long past, bind(A, 0) still
    fails EADDRINUSE (the 60 s end itself is not waited for)."""
    lab.set_tw_reuse(1)
    conns = [lab.egress(A, 0) for _ in range(P)]
    for sock in conns:
        assert connect(sock, T3) == 0
    lab.close_proxy_first(conns[0])
    time.sleep(3 * TW_REUSE_DELAY_MS / 1000)
    assert_bind_fails(lab.egress(), (A, 0), errno.EADDRINUSE)
    assert_bind_fails(lab.egress(reuseaddr=True), (A, 0), errno.EADDRINUSE)


def test_no_port_capacity_is_per_source_ip_and_target(lab: Lab) -> None:
    """Note §2 NO_PORT bullet: capacity is P per (source IP, target ip:port): from A, two
    to T3 and two to T4 at once; a third to T3 fails EADDRNOTAVAIL synchronously on a
    non-blocking socket; B -> T3 and A -> T3:9005 each still get P more."""
    lab.listen(T3_OTHER_PORT)
    held = [lab.open(target, A, no_port=True) for target in (T3, T3, T4, T4)]
    assert {_addr(s.getsockname())[1] for s in held} == {PORT_LO, PORT_HI}
    assert_connect_fails_now(lab.egress(A, no_port=True), T3, errno.EADDRNOTAVAIL)
    assert_connect_fails_now(lab.egress(A, no_port=True), T4, errno.EADDRNOTAVAIL)
    for _ in range(P):
        lab.open(T3, B, no_port=True)
        lab.open(T3_OTHER_PORT, A, no_port=True)
    assert_connect_fails_now(lab.egress(B, no_port=True), T3, errno.EADDRNOTAVAIL)


@pytest.mark.parametrize("tw_reuse", [1, 2], ids=["tw_reuse=1", "tw_reuse=2-on-127.x"])
@pytest.mark.parametrize("path", ["raw", "no_port"])
def test_time_wait_quad_is_reusable_only_after_tw_reuse_delay(
    lab: Lab, path: str, tw_reuse: int
) -> None:
    """Note §2 TIME_WAIT bullet, §3 table: with tcp_tw_reuse=1 (or the default 2, which
    counts any 127/8 address as loopback) and timestamps, the connect-time port choice
    reuses a TIME_WAIT quad once tcp_tw_reuse_delay has passed since TIME_WAIT began,
    and not before."""
    lab.set_tw_reuse(tw_reuse)
    src = A if path == "no_port" else None
    conns = [lab.open(T3, src, no_port=path == "no_port") for _ in range(P)]
    delay = TW_REUSE_DELAY_MS / 1000
    local, remote, t0 = lab.close_proxy_first(conns[0], confirm=False)
    early = connect_now(lab.egress(src, no_port=path == "no_port"), T3)
    t_early = time.monotonic()
    lab.wait_row(local, remote)  # it was TIME_WAIT that the early connect met
    assert t_early - t0 < delay, f"host too slow: first retry {t_early - t0:.3f} s after close"
    assert early == errno.EADDRNOTAVAIL, errno.errorcode.get(early, early)
    sock, t1 = wait_until_connects(T3, lambda: lab.egress(src, no_port=path == "no_port"))
    assert _addr(sock.getsockname()) == local
    assert t1 - t0 >= delay


def test_time_wait_reuse_needs_timestamps(lab: Lab) -> None:
    """Note §2 TIME_WAIT bullet: without negotiated TCP timestamps a TIME_WAIT quad is
    not reused even with tcp_tw_reuse=1 and the delay long past."""
    lab.ns.sysctl("net.ipv4.tcp_timestamps", 0)
    lab.set_tw_reuse(1)
    conns = [lab.open(T3, A, no_port=True) for _ in range(P)]
    lab.close_proxy_first(conns[0])
    time.sleep(3 * TW_REUSE_DELAY_MS / 1000)
    assert_connect_fails_now(lab.egress(A, no_port=True), T3, errno.EADDRNOTAVAIL)


def test_tw_reuse_2_does_not_reuse_time_wait_for_non_loopback_addresses(lab: Lab) -> None:
    """Note §2: the default tcp_tw_reuse=2 means loopback only. fd00:5::/64 on lo is not
    a loopback *address*, so its TIME_WAIT quad stays blocked past the delay; control:
    tcp_tw_reuse=1 then reuses it at once."""
    lab.set_tw_reuse(2)
    for cidr in (f"{A6}/128", f"{T3_6[0]}/128"):
        lab.ns.add_address(cidr)
    lab.listen(T3_6, socket.AF_INET6)
    conns = [lab.open(T3_6, A6, no_port=True, family=socket.AF_INET6) for _ in range(P)]
    lab.close_proxy_first(conns[0])
    time.sleep(3 * TW_REUSE_DELAY_MS / 1000)
    sock = lab.egress(A6, no_port=True, family=socket.AF_INET6)
    assert_connect_fails_now(sock, T3_6, errno.EADDRNOTAVAIL)
    lab.ns.sysctl("net.ipv4.tcp_tw_reuse", 1)
    lab.open(T3_6, A6, no_port=True, family=socket.AF_INET6)


@pytest.mark.parametrize("holder", ["listening", "bound"])
def test_bound_or_listening_port_in_range_leaves_the_egress_pool_for_every_ip(
    lab: Lab, holder: str
) -> None:
    """Note §2 last-but-one bullet: a port inside ip_local_port_range that is listening
    or explicitly bound (here on B) is skipped by connect-time choice for every IP (here
    A -> T3 via NO_PORT, and raw from 127.0.0.1) while it exists, and returns after."""
    held = lab.egress(B, PORT_LO)
    if holder == "listening":
        held.listen(1)
    only = lab.open(T3, A, no_port=True)
    assert _addr(only.getsockname())[1] == PORT_HI
    assert_connect_fails_now(lab.egress(A, no_port=True), T3, errno.EADDRNOTAVAIL)
    raw = lab.open(T3)
    assert _addr(raw.getsockname())[1] == PORT_HI
    held.close()
    again = lab.open(T3, A, no_port=True)
    assert _addr(again.getsockname())[1] == PORT_LO


def test_time_wait_lasts_60s_whatever_tcp_fin_timeout(lab: Lab) -> None:
    """Note §2 last bullet: TIME_WAIT lasts 60 s and tcp_fin_timeout does not change it:
    with tcp_fin_timeout=1 the fresh TIME_WAIT entry's timer reads ~60 s (read from
    /proc/net/tcp, not waited for)."""
    lab.ns.sysctl("net.ipv4.tcp_fin_timeout", 1)
    sock = lab.open(T3, A, no_port=True)
    local, remote, t0 = lab.close_proxy_first(sock)
    row = lab.wait_row(local, remote)
    left = row.timer_s + (time.monotonic() - t0)
    assert 58.0 <= left <= 61.0, f"TIME_WAIT timer {row.timer_s} s"


@pytest.mark.parametrize("timestamps", [1, 0])
def test_explicit_port_connect_reuses_own_time_wait_quad_at_once_with_timestamps(
    lab: Lab, timestamps: int
) -> None:
    """Beyond the note (which covers connect-time port choice only): once bind(A, p)
    has succeeded over a TIME_WAIT owner (both SO_REUSEADDR, §2 bind bullet), connect()
    to the *same* target reuses that TIME_WAIT quad at once even with tcp_tw_reuse=0,
    provided timestamps were negotiated; without them it fails EADDRNOTAVAIL. One more
    reason for §4 rule 1's "never bind a non-zero port": the outcome depends on state
    the proxy cannot see."""
    lab.ns.sysctl("net.ipv4.tcp_timestamps", timestamps)
    held = lab.egress(A, PORT_LO, reuseaddr=True)
    assert connect(held, T3) == 0
    lab.close_proxy_first(held)
    sock = lab.egress(A, PORT_LO, reuseaddr=True)
    expected = 0 if timestamps else errno.EADDRNOTAVAIL
    assert connect(sock, T3) == expected


# --- Section 3: TIME_WAIT and who closes first ---------------------------------------


def test_so_reuseaddr_changes_nothing_on_the_no_port_path(lab: Lab) -> None:
    """Note §3: SO_REUSEADDR on every NO_PORT socket changes neither the capacity (P
    per target, then EADDRNOTAVAIL at connect) nor TIME_WAIT (still blocked with
    tcp_tw_reuse=0 past the delay)."""
    lab.set_tw_reuse(0)
    conns = [lab.open(T3, A, no_port=True, reuseaddr=True) for _ in range(P)]
    assert_connect_fails_now(lab.egress(A, no_port=True, reuseaddr=True), T3, errno.EADDRNOTAVAIL)
    lab.close_proxy_first(conns[0])
    time.sleep(3 * TW_REUSE_DELAY_MS / 1000)
    assert_connect_fails_now(lab.egress(A, no_port=True, reuseaddr=True), T3, errno.EADDRNOTAVAIL)


def test_so_linger_zero_close_leaves_no_time_wait(lab: Lab) -> None:
    """Note §3 table and §4 rule 4: closing with SO_LINGER {1, 0} sends RST, leaves no
    TIME_WAIT, and the quad is reusable at once (tcp_tw_reuse=0)."""
    conns = [lab.open(T3, A, no_port=True) for _ in range(P)]
    local = _addr(conns[0].getsockname())
    conns[0].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conns[0].close()
    assert not [r for r in lab.tcp_rows() if r.local == local and r.remote == T3]
    again = lab.open(T3, A, no_port=True)
    assert _addr(again.getsockname()) == local


def test_target_closing_first_leaves_time_wait_on_the_target_side(lab: Lab) -> None:
    """Note §3 table: when the target closes first, TIME_WAIT is the target's, and the
    proxy's quad is reusable at once (tcp_tw_reuse=0)."""
    conns = [lab.open(T3, A, no_port=True) for _ in range(P)]
    local = _addr(conns[0].getsockname())
    peer = lab.peer_of(conns[0])
    peer.close()
    conns[0].setblocking(True)
    conns[0].settimeout(TIMEOUT)
    assert conns[0].recv(1) == b""
    conns[0].close()
    lab.wait_row(T3, local)  # the target's side is in TIME_WAIT
    lab.wait_gone(local, T3)  # the proxy's side: LAST_ACK for at most a loopback RTT
    again = lab.open(T3, A, no_port=True)
    assert _addr(again.getsockname()) == local


def test_no_port_works_on_ipv6_sockets(lab: Lab) -> None:
    """Note §2 NO_PORT bullet, on AF_INET6: IP_BIND_ADDRESS_NO_PORT set at level
    IPPROTO_IP on an AF_INET6 socket defers the port (getsockname port 0 after bind),
    and capacity is P per target: 2 to T3 and 2 to T4 from A6, then EADDRNOTAVAIL at
    connect, synchronously."""
    for cidr in (f"{A6}/128", f"{T3_6[0]}/128", f"{T4_6[0]}/128"):
        lab.ns.add_address(cidr)
    for target in (T3_6, T4_6):
        lab.listen(target, socket.AF_INET6)
    probe = lab.egress(A6, no_port=True, family=socket.AF_INET6)
    assert probe.getsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT) == 1
    assert _addr(probe.getsockname()) == (A6, 0)
    probe.close()
    held = [
        lab.open(target, A6, no_port=True, family=socket.AF_INET6)
        for target in (T3_6, T3_6, T4_6, T4_6)
    ]
    assert {_addr(s.getsockname())[1] for s in held} == {PORT_LO, PORT_HI}
    sock = lab.egress(A6, no_port=True, family=socket.AF_INET6)
    assert_connect_fails_now(sock, T3_6, errno.EADDRNOTAVAIL)


def test_ip_local_port_range_partitions_but_adds_no_capacity(lab: Lab) -> None:
    """Note §3: IP_LOCAL_PORT_RANGE (optname 51, packed u32 hi << 16 | lo) narrows one
    socket's choice inside the namespace range; a range outside it is ignored, so it
    adds no capacity."""

    def ranged(lo: int, hi: int) -> socket.socket:
        sock = lab.egress(no_port=True)
        sock.setsockopt(socket.IPPROTO_IP, IP_LOCAL_PORT_RANGE, struct.pack("=I", hi << 16 | lo))
        sock.bind((A, 0))
        return sock

    upper = ranged(PORT_HI, PORT_HI)
    assert connect(upper, T3) == 0
    assert _addr(upper.getsockname())[1] == PORT_HI
    assert_connect_fails_now(ranged(PORT_HI, PORT_HI), T3, errno.EADDRNOTAVAIL)
    outside = ranged(40000, 40009)  # not inside 50000-50001: ignored, namespace range used
    assert connect(outside, T3) == 0
    assert _addr(outside.getsockname())[1] == PORT_LO
    assert_connect_fails_now(ranged(40000, 40009), T3, errno.EADDRNOTAVAIL)


# --- Section 4: the errno table the egress path maps ----------------------------------


def test_bind_to_an_unconfigured_ip_fails_at_bind_with_eaddrnotavail(lab: Lab) -> None:
    """Note §4 rule 2: bind() to an IP no interface has fails EADDRNOTAVAIL, with or
    without NO_PORT (a configuration error, not exhaustion). No packet is sent."""
    assert_bind_fails(lab.egress(), (UNCONFIGURED_IP, 0), errno.EADDRNOTAVAIL)
    assert_bind_fails(lab.egress(no_port=True), (UNCONFIGURED_IP, 0), errno.EADDRNOTAVAIL)


def test_connect_to_a_closed_target_port_fails_econnrefused(lab: Lab) -> None:
    """Note §4 rule 2: a target that answers RST gives ECONNREFUSED from the NO_PORT
    connect (synchronously or via SO_ERROR: the egress path must handle both)."""
    assert connect(lab.egress(A, no_port=True), (T3[0], 9999)) == errno.ECONNREFUSED
