"""UDP ASSOCIATE (RFC 1928 section 7): one association, from its reply until its end.

Owns: the association's relay socket on the ingress IP (where the client sends), one
egress UDP socket per target family bound to the ingress-matched egress IP (made on
the first datagram of that family), the source check, the per-datagram destination
rules, the counters, and the association's one `tunnel_closed` line.
Must not: speak the TCP handshake (the session does, and hands over the control
connection); create TCP sockets.

The association lives as long as the client's TCP control connection: its EOF or
error ends it, and so does `timeouts.udp_idle` without a datagram either way.
IP_BIND_ADDRESS_NO_PORT does not apply to UDP: each egress socket binds a port once,
which the per-IP `udp_open` figure counts.
"""

from __future__ import annotations

import errno
import random
import socket
from typing import Any

from socksd import access, policy
from socksd.codec import AddressType, ProtocolError, Reply
from socksd.config import hostport
from socksd.handlers import ReadOnlyHandler
from socksd.revocation import Admitted, Grant, handed_over
from socksd.socks5_udp import encode_udp_header, parse_udp_datagram
from workers.accounting import Moved, Recorded, record_due
from workers.context import WorkerContext
from workers.events import Refused, errno_name, tunnel_closed
from workers.limits import Claim, UdpClaim
from workers.loop import EVENT_READ
from workers.pressure import IpCounters

BURST = 64  # datagrams read per readiness event and socket: one busy peer cannot starve
_RESOLVE_QUEUE = 16  # datagrams held per name while it is being resolved
_NAME_CACHE = 256  # resolved names kept per association
_MAX_PEERS = 4096  # targets per association that may answer
_RANGE_TRIES = 64  # ports of udp.port_range tried for one association


def open_relay_socket(ingress_ip: str, port_range: tuple[int, int] | None) -> socket.socket:
    """The association's relay socket: on the IP the client came in on, its port from
    the kernel or, with `udp.port_range`, a free one in that range (the reply's
    BND.PORT; a firewall opens just the range).

    Raises:
        Refused: 0x01 when the socket cannot be made (EMFILE: a reply, no crash) or bound
            (every port of the range tried is taken: `udp_port_range_full`).
    """
    try:
        relay = socket.socket(
            policy.family_of(ingress_ip), socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
        )
    except OSError as exc:
        raise Refused(
            Reply.GENERAL_FAILURE, "udp_socket_failed", errno=errno_name(exc.errno)
        ) from exc
    try:
        if port_range is None:
            relay.bind((ingress_ip, 0))
        else:
            _bind_in_range(relay, ingress_ip, port_range)
    except OSError as exc:
        relay.close()
        reason = "udp_port_range_full" if exc.errno == errno.EADDRINUSE else "udp_bind_failed"
        raise Refused(Reply.GENERAL_FAILURE, reason, errno=errno_name(exc.errno)) from exc
    return relay


def _bind_in_range(sock: socket.socket, ip: str, port_range: tuple[int, int]) -> None:
    """Bind to a free port of `port_range`: _RANGE_TRIES ports drawn at random (bind()
    is a syscall each: a nearly full range is refused, not scanned; random draws, not a
    run from one start, so taken ports do not bunch up and refuse a range half empty).

    Raises:
        OSError: EADDRINUSE when every port tried is taken; another bind error as is.
    """
    low, high = port_range
    size = high - low + 1
    ports = random.sample(range(low, high + 1), min(size, _RANGE_TRIES))
    for port in ports:
        try:
            sock.bind((ip, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
        else:
            return
    raise OSError(errno.EADDRINUSE, "no free port in udp.port_range")


class _Handler(ReadOnlyHandler):
    """Loop handler for one of the association's sockets."""

    __slots__ = ("assoc", "kind", "sock")

    def __init__(self, assoc: UdpAssociation, kind: str, sock: socket.SocketType) -> None:
        self.assoc = assoc
        self.kind = kind
        self.sock = sock

    def on_readable(self) -> None:
        if self.kind == "control":
            self.assoc.on_control()
        elif self.kind == "client":
            self.assoc.from_client()
        else:
            self.assoc.from_target(self.sock)

    def on_crash(self, exc: BaseException) -> None:
        self.assoc.crash(exc)


class UdpAssociation:
    """The relay of one UDP ASSOCIATE request."""

    udp = True  # the books count its bytes and datagrams apart from TCP's

    def __init__(
        self,
        ctx: WorkerContext,
        control: socket.SocketType,
        control_mask: int,
        relay: socket.socket,
        *,
        log: Any,
        started: float,
        ingress_ip: str,
        client_ip: str,
        announced: tuple[str, int],
        user_rules: tuple[access.Rule, ...],
        claim: Claim | None,
        admitted: Admitted,
        udp_claim: UdpClaim | None = None,
    ) -> None:
        self._ctx = ctx
        self.admitted = admitted  # what a reload re-checks (and the books read)
        self.recorded: Recorded | None = None  # its last tunnel_usage record
        self._loop = ctx.loop
        self._log = log
        self.started = started
        self._ingress_ip = ingress_ip
        self.user_rules = user_rules  # the user's destination rules (a reload renews them)
        self._claim = claim
        self._udp_claim = udp_claim  # its place in the association counts (limits)
        self.control = control
        self.relay = relay
        # The worker's shared read buffer (64 KiB): a datagram is handled before the
        # next read, so an association owns no buffer (bytes kept for a name lookup
        # are copied out).
        self._view = ctx.buffer
        # Who may send: only the control connection's IP, from the port the client
        # announced; with no port announced (zeros), or an address that is not its own
        # (a client behind NAT announces its private one), the first datagram's port.
        # Nobody else can inject datagrams into (or receive from) the association.
        host, port = announced
        own = (
            bool(host) and host not in ("0.0.0.0", "::") and policy.normalize_ip(host) == client_ip
        )
        self._want_ip = client_ip
        self._want_port = port if own else 0
        self._client: tuple[Any, ...] | None = None  # where replies go, once known
        # Targets the client sent to: only they may answer (no unsolicited datagrams
        # reach the client through our port). Bounded; the oldest are forgotten first.
        self._peers: dict[tuple[str, int], None] = {}
        self._egress: dict[int, tuple[socket.socket, IpCounters]] = {}
        self._names: dict[str, str] = {}  # domain -> its first address (IPv4 first)
        self._resolving: dict[str, list[tuple[int, bytes]]] = {}
        self.up = self.down = 0  # datagrams
        self.bytes_up = self.bytes_down = 0
        self.dropped: dict[str, int] = {}
        self.closed = False
        self._last = self._loop.now  # the idle sweep (workers.sweeps) reads it
        # The control connection: take the session's registration over (or make one).
        handler = _Handler(self, "control", control)
        if control_mask:
            self._loop.modify(control, EVENT_READ, handler)
        else:
            self._loop.register(control, EVENT_READ, handler)
        self._loop.register(relay, EVENT_READ, _Handler(self, "client", relay))
        ctx.open.add(self)
        ctx.counters.open_tunnels += 1

    # -- client -> targets -------------------------------------------------------------

    def from_client(self) -> None:
        for _ in range(BURST):
            try:
                n, addr = self.relay.recvfrom_into(self._view)
            except BlockingIOError:
                return
            except OSError:
                continue  # e.g. ICMP port unreachable reported on the socket
            if self.closed:
                return
            if not self._from_the_client(addr):
                self._drop("wrong_source")
                continue
            try:
                datagram = parse_udp_datagram(self._view[:n])
            except ProtocolError as exc:
                self._drop(exc.reason)
                continue
            if datagram.frag:
                self._drop("fragmented")  # RFC 1928 allows dropping what we do not reassemble
                continue
            self._last = self._loop.now
            if datagram.address_type is AddressType.DOMAINNAME:
                self._by_name(datagram.host, datagram.port, bytes(datagram.data))
            else:
                self._send_out(datagram.host, datagram.port, datagram.data)

    def _from_the_client(self, addr: tuple[Any, ...]) -> bool:
        if policy.normalize_ip(addr[0]) != self._want_ip:
            return False
        if self._want_port and addr[1] != self._want_port:
            return False
        if self._client is None:
            self._client = addr
            self._want_port = addr[1]  # pinned: the first sender's port from now on
        return True

    def _by_name(self, host: str, port: int, data: bytes) -> None:
        ip = self._names.get(host)
        if ip is not None:
            self._send_out(ip, port, data)
            return
        queue = self._resolving.get(host)
        if queue is not None:
            if len(queue) < _RESOLVE_QUEUE:
                queue.append((port, data))
            else:
                self._drop("resolve_queue_full")
            return
        self._resolving[host] = [(port, data)]
        self._ctx.resolver.resolve(host, port, lambda a, e: self._resolved(host, a, e))

    def _resolved(self, host: str, addresses: Any, error: str | None) -> None:
        queue = self._resolving.pop(host, [])
        if self.closed:
            return
        families = {socket.AF_INET: 0, socket.AF_INET6: 1}
        ordered = sorted(addresses or [], key=lambda a: families.get(a[0], 2))
        if error is not None or not ordered:
            for _ in queue:
                self._drop("name_not_resolved")
            return
        ip = ordered[0][1][0]
        if len(self._names) >= _NAME_CACHE:
            self._names.clear()
        self._names[host] = ip
        for port, data in queue:
            self._send_out(ip, port, data)

    def _send_out(self, ip: str, port: int, data: bytes | memoryview) -> None:
        ctx = self._ctx
        verdict = ctx.destinations.check(ip, port, self._ingress_ip, self.user_rules)
        if verdict is not None:
            self._drop("destination_denied")
            ctx.limits.refuse(
                "udp_destination_denied",
                self._loop.now,
                "destination_denied",
                address=hostport(ip, port),
                rule=verdict.rule,
            )
            return
        family = policy.family_of(ip)
        egress = self._egress.get(family) or self._open_egress(family)
        if egress is None:
            return
        peer = (policy.normalize_ip(ip), port)  # as the answer's source will read
        if peer not in self._peers:
            if len(self._peers) >= _MAX_PEERS:
                del self._peers[next(iter(self._peers))]
            self._peers[peer] = None
        try:
            egress[0].sendto(data, (ip, port))
        except BlockingIOError:
            self._drop("egress_busy")  # UDP may drop; we never queue without bound
            return
        except OSError as exc:
            self._drop(f"egress_{errno_name(exc.errno)}")
            return
        self.up += 1
        self.bytes_up += len(data)

    def _open_egress(self, family: socket.AddressFamily) -> tuple[socket.socket, IpCounters] | None:
        ctx = self._ctx
        source = ctx.policy.source(self._ingress_ip, family)
        if source is None:
            self._drop("no_egress_for_family")  # never another source IP than the client's
            return None
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        except OSError as exc:  # EMFILE: this datagram is dropped, the next one retries
            self._drop(f"socket_{errno_name(exc.errno)}")
            return None
        try:
            sock.bind((source, 0))
        except OSError as exc:
            sock.close()
            self._drop(f"bind_{errno_name(exc.errno)}")
            return None
        ipc = ctx.pressure.ip(source)
        ipc.udp_open += 1
        self._egress[family] = (sock, ipc)
        self._loop.register(sock, EVENT_READ, _Handler(self, "egress", sock))
        return sock, ipc

    # -- targets -> client -------------------------------------------------------------

    def from_target(self, sock: socket.SocketType) -> None:
        header_room = 22  # the longest header (IPv6) goes in front of the payload
        for _ in range(BURST):
            try:
                n, addr = sock.recvfrom_into(self._view[header_room:])
            except BlockingIOError:
                return
            except OSError:
                continue
            if self.closed:
                return
            source = (policy.normalize_ip(addr[0]), addr[1])
            if source not in self._peers:
                self._drop("unsolicited")
                continue
            if self._client is None:
                self._drop("no_client_address")
                continue
            self._last = self._loop.now
            header = encode_udp_header(*source)
            start = header_room - len(header)
            self._view[start:header_room] = header
            try:
                self.relay.sendto(self._view[start : header_room + n], self._client)
            except BlockingIOError:
                self._drop("client_busy")
                continue
            except OSError as exc:
                self._drop(f"client_{errno_name(exc.errno)}")
                continue
            self.down += 1
            self.bytes_down += n

    # -- control connection and endings ------------------------------------------------

    def on_control(self) -> None:
        try:
            data = self.control.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self.close("client_error")
            return
        if not data:
            self.close("eof")  # the client ended the association
        # Anything else on the control connection has no meaning: discarded.

    def quiet_since(self) -> float:
        """Loop time of the last datagram either way (`timeouts.udp_idle` ends it)."""
        return self._last

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        counters = self._ctx.counters.udp_dropped
        counters[reason] = counters.get(reason, 0) + 1

    def moved(self) -> Moved:
        """Payload bytes and datagrams relayed so far: (bytes up, down, datagrams up, down)."""
        return self.bytes_up, self.bytes_down, self.up, self.down

    def record_usage(self) -> None:
        """A due `tunnel_usage` line (the accounting sweep calls it)."""
        ledger = self._ctx.ledger
        assert ledger is not None
        record_due(ledger, self, self._log, self._loop.now)

    def describe(self) -> tuple[Any, str, float, int, int]:
        """For `socksd tunnels`: the bound logger, the kind, the loop time it started,
        the bytes each way."""
        return self._log, "udp", self.started, self.bytes_up, self.bytes_down

    def granted(self) -> Grant:
        return handed_over(self.admitted)

    def revoke(self, by: str) -> None:
        """A reload's new config refuses this association: end it now."""
        self._log = self._log.bind(revoked_by=by)
        self.close("revoked")

    def crash(self, exc: BaseException) -> None:
        self._log.error("udp_association_crashed", exc_info=exc)
        self.close("crashed")

    def close(self, reason: str, abortive: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self._loop
        for sock in (self.control, self.relay):
            loop.forget(sock.fileno())
            sock.close()
        for sock, ipc in self._egress.values():
            loop.forget(sock.fileno())
            sock.close()
            ipc.udp_open -= 1
        self._egress.clear()
        ctx = self._ctx
        ctx.open.discard(self)
        c = ctx.counters
        c.open_tunnels -= 1
        c.tunnels_closed += 1
        c.udp_datagrams_up += self.up
        c.udp_datagrams_down += self.down
        c.udp_bytes_up += self.bytes_up
        c.udp_bytes_down += self.bytes_down
        if self._claim is not None:
            self._claim.release()
            self._claim = None
        if self._udp_claim is not None:
            self._udp_claim.release()
            self._udp_claim = None
        unreported = extra = None
        if ctx.ledger is not None:
            rest = ctx.ledger.closed(self.admitted, True, self.moved(), self.recorded)
            if rest is not None:
                unreported = rest[0], rest[1]
                extra = {"unreported_datagrams_up": rest[2], "unreported_datagrams_down": rest[3]}
        tunnel_closed(
            self._log,
            reason,
            self.started,
            loop.now,
            self.bytes_up,
            self.bytes_down,
            unreported=unreported,
            datagrams_up=self.up,
            datagrams_down=self.down,
            dropped=self.dropped,
            **(extra or {}),
        )
