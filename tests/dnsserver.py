"""A real DNS server for tests: the upstream that socksd's resolver is pointed at.

socksd resolves names with c-ares on each worker's loop and caches the answers (TTL clamps,
negative caching, coalescing, serve-stale). Testing that needs an upstream whose every
answer the test decides: this module is that upstream. It speaks the RFC 1035 wire format
over UDP and TCP (2-byte length prefix, several queries per connection) on one loopback
port, from a daemon thread, with standard-library code only:

    with DNSServer() as dns:
        dns.add("www.example.test", "A", "192.0.2.1", ttl=60)
        dns.set_rcode("gone.example.test", NXDOMAIN)
        config = f'[resolver]\\nnameservers = ["{dns.nameserver}"]\\n'
        ...
        assert dns.queries("www.example.test", "A", "udp") == 1

What it answers, for a question (name, type):

* a per-name (or global, name=None) rcode set by `set_rcode` wins: that rcode with no
  answers; NXDOMAIN also carries the SOA below;
* records of that type at the name: NOERROR with them (AA and RA set);
* a CNAME at the name: the CNAME, then the same question at its target, as a recursive
  resolver's answer would chain them (a target outside the zone ends the chain);
* other records at the name only: NODATA, i.e. NOERROR, no answers, and an SOA in the
  authority section whose TTL and MINIMUM are the name's negative TTL (RFC 2308);
* a name with no records at all: NXDOMAIN with that SOA.

Behaviours for failure tests: `set_delay` (answer later, from a timer heap in the server
thread, so other names are answered meanwhile), `drop` (never answer: the client times out),
`truncate` (over UDP, an empty answer with TC set; over TCP, the full answer). Every query
is counted and logged before any of these apply (`queries`, `log`, `wait_queries`).

Limits, on purpose: one flat zone without delegation, wildcards or empty non-terminals;
record types A, AAAA, CNAME and TXT only (the SOA is synthesised); class is not checked (answers
are class IN); an EDNS OPT in the query is ignored and none is sent back, so UDP answers
over 512 bytes are truncated (TC) like any non-EDNS server's; no DNSSEC, no zone transfers,
no NOTIFY/UPDATE (other opcodes get NOTIMP). Unparsable queries get FORMERR when their
header is readable and are otherwise ignored; they are counted in `malformed`, not in the
log. Labels are handled as bytes (latin-1), so names must not contain dots inside labels.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import ipaddress
import itertools
import selectors
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import NamedTuple

__all__ = [
    "AAAA",
    "CNAME",
    "FORMERR",
    "NOERROR",
    "NOTIMP",
    "NXDOMAIN",
    "REFUSED",
    "SERVFAIL",
    "SOA",
    "TXT",
    "A",
    "DNSServer",
    "QueryLogEntry",
]

# Record types (RFC 1035 3.2.2, RFC 3596).
A = 1
CNAME = 5
SOA = 6
TXT = 16
AAAA = 28
OPT = 41
ANY = 255
TYPE_NAMES = {
    A: "A",
    CNAME: "CNAME",
    SOA: "SOA",
    TXT: "TXT",
    AAAA: "AAAA",
    OPT: "OPT",
    ANY: "ANY",
}
TYPE_CODES = {text: code for code, text in TYPE_NAMES.items()}

# Response codes (RFC 1035 4.1.1).
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5

CLASS_IN = 1
HEADER = struct.Struct("!HHHHHH")
UDP_LIMIT = 512  # no EDNS is echoed, so RFC 1035's limit holds for UDP answers
MAX_TCP_BUFFER = 1 << 20
SELECT_TIMEOUT = 0.2  # also bounds how long stop() waits for the loop to notice
DEFAULT_NEGATIVE_TTL = 30
CNAME_CHAIN_LIMIT = 16


class FormatError(ValueError):
    """The query cannot be parsed: answered with FORMERR."""


class QueryLogEntry(NamedTuple):
    """One received query: monotonic time, "udp" or "tcp", lower-case name, type mnemonic."""

    time: float
    transport: str
    name: str
    qtype: str


class _Record(NamedTuple):
    rtype: int
    value: str  # an address for A/AAAA, a normalised name for CNAME
    ttl: int


class _Question(NamedTuple):
    raw_labels: tuple[bytes, ...]  # as received: answers echo the client's letter case
    qtype: int
    qclass: int

    @property
    def name(self) -> str:
        return _key(b".".join(self.raw_labels).decode("latin-1"))


def _key(name: str) -> str:
    """The lookup form of a name: lower case, no trailing dot ("" is the root)."""
    return name.lower().rstrip(".")


def _type_code(qtype: int | str) -> int:
    if isinstance(qtype, int):
        return qtype
    text = qtype.upper()
    if text in TYPE_CODES:
        return TYPE_CODES[text]
    if text.startswith("TYPE") and text[4:].isdigit():
        return int(text[4:])
    raise ValueError(f"unknown DNS type {qtype!r}")


def _type_name(code: int) -> str:
    return TYPE_NAMES.get(code, f"TYPE{code}")


def _labels(name: str) -> tuple[bytes, ...]:
    """Wire labels of a presentation name; ValueError when it cannot be encoded."""
    stripped = name.rstrip(".")
    if not stripped:
        return ()
    labels = tuple(part.encode("latin-1") for part in stripped.split("."))
    if any(not 0 < len(label) < 64 for label in labels):
        raise ValueError(f"bad label length in DNS name {name!r}")
    if sum(len(label) + 1 for label in labels) + 1 > 255:
        raise ValueError(f"DNS name too long: {name!r}")
    return labels


def _read_name(msg: bytes, offset: int) -> tuple[tuple[bytes, ...], int]:
    """Decode a possibly compressed name at offset; returns (labels, offset after it)."""
    labels: list[bytes] = []
    end = -1  # where the name ends in the message: after the first pointer, if any
    jumps = 0
    total = 1
    while True:
        if offset >= len(msg):
            raise FormatError("name runs past the message")
        length = msg[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(msg):
                raise FormatError("truncated compression pointer")
            target = ((length & 0x3F) << 8) | msg[offset + 1]
            if end < 0:
                end = offset + 2
            jumps += 1
            if jumps > 64 or target >= offset:
                raise FormatError("compression pointer loop or forward pointer")
            offset = target
            continue
        if length & 0xC0:
            raise FormatError("unsupported label type")
        offset += 1
        if length == 0:
            return tuple(labels), (end if end >= 0 else offset)
        if offset + length > len(msg):
            raise FormatError("label runs past the message")
        total += length + 1
        if total > 255:
            raise FormatError("name longer than 255 bytes")
        labels.append(msg[offset : offset + length])
        offset += length


def _parse_query(msg: bytes) -> tuple[int, int, _Question]:
    """(id, flags, question) of a query; FormatError for anything but one question."""
    if len(msg) < HEADER.size:
        raise FormatError("shorter than a header")
    qid, flags, qdcount, _an, _ns, _ar = HEADER.unpack_from(msg)
    if qdcount != 1:
        raise FormatError(f"{qdcount} questions")
    labels, offset = _read_name(msg, HEADER.size)
    if offset + 4 > len(msg):
        raise FormatError("question runs past the message")
    qtype, qclass = struct.unpack_from("!HH", msg, offset)
    # Answer, authority and additional records (an EDNS OPT among them) are not read.
    return qid, flags, _Question(labels, qtype, qclass)


class _Writer:
    """Builds a message, compressing names against the suffixes already written."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self._suffixes: dict[tuple[bytes, ...], int] = {}

    def name(self, labels: tuple[bytes, ...]) -> None:
        for i in range(len(labels)):
            suffix = tuple(label.lower() for label in labels[i:])
            pointer = self._suffixes.get(suffix)
            if pointer is not None:
                self.buf += struct.pack("!H", 0xC000 | pointer)
                return
            if len(self.buf) < 0x3FFF:
                self._suffixes[suffix] = len(self.buf)
            self.buf.append(len(labels[i]))
            self.buf += labels[i]
        self.buf.append(0)

    def rr(self, owner: tuple[bytes, ...], rtype: int, ttl: int, rdata: Callable[[], None]) -> None:
        self.name(owner)
        self.buf += struct.pack("!HHI", rtype, CLASS_IN, ttl)
        length_at = len(self.buf)
        self.buf += b"\0\0"
        rdata()
        struct.pack_into("!H", self.buf, length_at, len(self.buf) - length_at - 2)


class _Answer(NamedTuple):
    rcode: int
    answers: list[tuple[tuple[bytes, ...], _Record]]  # (owner labels, record)
    soa: tuple[tuple[bytes, ...], int] | None  # (owner labels, negative TTL)


class _Pending(NamedTuple):
    due: float
    seq: int
    send: Callable[[], None]


class _TcpConn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closed = False


class DNSServer:
    """An authoritative-style DNS responder on one loopback port, UDP and TCP; see module doc.

    All methods are thread-safe; zone data may change while the server runs and applies to
    the next query received.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        negative_ttl: int = DEFAULT_NEGATIVE_TTL,
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"test DNS server binds loopback only, not {host!r}")
        self.host = host
        self._requested_port = port
        self.port = 0
        self.negative_ttl = negative_ttl
        self._initial_negative_ttl = negative_ttl
        self.malformed = 0
        self._lock = threading.Lock()
        self._logged = threading.Condition(self._lock)
        self._records: dict[str, list[_Record]] = {}
        self._rcodes: dict[str | None, int] = {}
        self._negative_ttls: dict[str, int] = {}
        self._delays: dict[str | None, float] = {}
        self._dropped: set[str | None] = set()
        self._truncated: set[str | None] = set()
        self._log: list[QueryLogEntry] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # Owned by the server thread only:
        self._selector: selectors.BaseSelector | None = None
        self._conns: dict[int, _TcpConn] = {}
        self._timers: list[_Pending] = []
        self._seq = itertools.count()

    # ----- lifecycle -------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) that both the UDP and the TCP socket are bound to."""
        return self.host, self.port

    @property
    def nameserver(self) -> str:
        """The server as c-ares and socksd's config take it: "127.0.0.1:PORT", "[::1]:PORT"."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> DNSServer:
        """Bind UDP and TCP to one port (a free one for port 0) and start serving."""
        if self._thread is not None:
            raise RuntimeError("DNSServer already started")
        self._udp, self._tcp = self._bind()
        self.port = self._udp.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._udp, selectors.EVENT_READ, "udp")
        self._selector.register(self._tcp, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(
            target=self._run, name=f"dnsserver-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close every socket and join the thread (at most `timeout` s)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"DNS server thread did not stop within {timeout} s")
        self._thread = None

    def __enter__(self) -> DNSServer:
        return self if self._thread is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        attempts = 1 if self._requested_port else 50
        for _ in range(attempts):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                udp.bind((self.host, self._requested_port))
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.host, udp.getsockname()[1]))
                tcp.listen(64)
            except OSError as exc:
                udp.close()
                tcp.close()
                if exc.errno != errno.EADDRINUSE or self._requested_port:
                    raise
                continue
            return udp, tcp
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")

    # ----- zone data -------------------------------------------------------------------

    def add(self, name: str, rtype: int | str, value: str, ttl: int = 300) -> None:
        """Add an A, AAAA, CNAME or TXT record (the same type and value again replaces its TTL)."""
        code = _type_code(rtype)
        _labels(name)
        if not 0 <= ttl < 2**31:
            raise ValueError(f"TTL out of range: {ttl}")
        if code == A:
            value = str(ipaddress.IPv4Address(value))
        elif code == AAAA:
            value = str(ipaddress.IPv6Address(value))
        elif code == CNAME:
            _labels(value)
            value = _key(value)
        elif code == TXT:
            if len(value.encode()) > 255:
                raise ValueError("one TXT string of at most 255 bytes")
        else:
            raise ValueError(f"only A, AAAA, CNAME and TXT records are served, not {rtype!r}")
        with self._lock:
            records = self._records.setdefault(_key(name), [])
            records[:] = [r for r in records if (r.rtype, r.value) != (code, value)]
            records.append(_Record(code, value, ttl))

    def remove(self, name: str, rtype: int | str | None = None) -> None:
        """Remove a name's records of one type, or all of them (the name then is NXDOMAIN)."""
        key = _key(name)
        code = None if rtype is None else _type_code(rtype)
        with self._lock:
            kept = [r for r in self._records.get(key, []) if code is not None and r.rtype != code]
            if kept:
                self._records[key] = kept
            else:
                self._records.pop(key, None)

    def set_rcode(self, name: str | None, rcode: int | None) -> None:
        """Answer `name` (None: every name) with this rcode and no answers; None clears it.

        A name's own rcode wins over the global one, and over its records. NXDOMAIN comes
        with an SOA for negative caching; SERVFAIL, REFUSED and others come bare.
        """
        key = None if name is None else _key(name)
        with self._lock:
            if rcode is None:
                self._rcodes.pop(key, None)
            elif 0 <= rcode < 16:
                self._rcodes[key] = rcode
            else:
                raise ValueError(f"rcode out of range: {rcode}")

    def set_negative_ttl(self, name: str | None, ttl: int | None) -> None:
        """TTL and MINIMUM of the SOA sent with NXDOMAIN/NODATA for `name`.

        None as name sets the zone default (None as ttl: back to the constructor's); for a
        name, None as ttl falls back to the zone default.
        """
        with self._lock:
            if name is None:
                self.negative_ttl = self._initial_negative_ttl if ttl is None else ttl
            elif ttl is None:
                self._negative_ttls.pop(_key(name), None)
            else:
                self._negative_ttls[_key(name)] = ttl

    def set_delay(self, name: str | None, seconds: float) -> None:
        """Answer `name` (None: every name without a delay of its own) after `seconds`; 0 clears."""
        key = None if name is None else _key(name)
        with self._lock:
            if seconds > 0:
                self._delays[key] = seconds
            else:
                self._delays.pop(key, None)

    def drop(self, name: str | None, on: bool = True) -> None:
        """Never answer `name` (None: every name), over UDP and TCP: the client times out."""
        self._flag(self._dropped, name, on)

    def truncate(self, name: str | None, on: bool = True) -> None:
        """Over UDP answer `name` (None: every name) with TC set and no records; TCP in full."""
        self._flag(self._truncated, name, on)

    def _flag(self, flags: set[str | None], name: str | None, on: bool) -> None:
        key = None if name is None else _key(name)
        with self._lock:
            if on:
                flags.add(key)
            else:
                flags.discard(key)

    def clear(self) -> None:
        """Forget every record, rcode, negative TTL, delay, drop and truncation (not counts)."""
        with self._lock:
            self._records.clear()
            self._rcodes.clear()
            self._negative_ttls.clear()
            self._delays.clear()
            self._dropped.clear()
            self._truncated.clear()
            self.negative_ttl = self._initial_negative_ttl

    # ----- counters --------------------------------------------------------------------

    def queries(
        self,
        name: str | None = None,
        qtype: int | str | None = None,
        transport: str | None = None,
    ) -> int:
        """How many well-formed queries arrived matching all the filters given."""
        with self._lock:
            return sum(1 for _ in self._matching(name, qtype, transport))

    @property
    def log(self) -> list[QueryLogEntry]:
        """Every well-formed query received, in order: (time, transport, name, qtype)."""
        with self._lock:
            return list(self._log)

    def reset_counts(self) -> None:
        """Empty the query log (and so every count) and the malformed count."""
        with self._lock:
            self._log.clear()
            self.malformed = 0

    def wait_queries(
        self,
        count: int,
        name: str | None = None,
        qtype: int | str | None = None,
        transport: str | None = None,
        timeout: float = 5.0,
    ) -> bool:
        """Wait until at least `count` matching queries arrived; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._logged:
            while sum(1 for _ in self._matching(name, qtype, transport)) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._logged.wait(left)
            return True

    def _matching(
        self, name: str | None, qtype: int | str | None, transport: str | None
    ) -> list[QueryLogEntry]:
        key = None if name is None else _key(name)
        tname = None if qtype is None else _type_name(_type_code(qtype))
        return [
            entry
            for entry in self._log
            if (key is None or entry.name == key)
            and (tname is None or entry.qtype == tname)
            and (transport is None or entry.transport == transport.lower())
        ]

    # ----- the server thread -----------------------------------------------------------

    def _run(self) -> None:
        assert self._selector is not None
        try:
            while not self._stopping.is_set():
                timeout = SELECT_TIMEOUT
                if self._timers:
                    timeout = max(0.0, min(timeout, self._timers[0].due - time.monotonic()))
                try:
                    events = self._selector.select(timeout)
                except OSError as exc:  # EINTR is retried by Python; anything else is a bug
                    _warn(f"select failed: {exc!r}")
                    time.sleep(0.01)
                    continue
                for key, mask in events:
                    self._guarded(self._on_event, key, mask)
                now = time.monotonic()
                while self._timers and self._timers[0].due <= now:
                    self._guarded(heapq.heappop(self._timers).send)
        finally:
            self._close_all()

    def _guarded(self, func: Callable[..., None], *args: object) -> None:
        """Run one handler; an exception is reported and the loop goes on."""
        try:
            func(*args)
        except Exception:  # noqa: BLE001 - the server thread must survive any input
            _warn("handler failed:\n" + traceback.format_exc())

    def _on_event(self, key: selectors.SelectorKey, mask: int) -> None:
        tag = key.data
        if tag == "wake":
            with contextlib.suppress(OSError):
                self._wake_r.recv(512)  # type: ignore[union-attr]
        elif tag == "udp":
            self._on_udp()
        elif tag == "listen":
            self._on_accept()
        elif isinstance(tag, _TcpConn):
            if mask & selectors.EVENT_READ:
                self._on_tcp_read(tag)
            if mask & selectors.EVENT_WRITE and not tag.closed:
                self._flush(tag)

    def _on_udp(self) -> None:
        assert self._udp is not None
        for _ in range(64):  # bounded, so timers and TCP get their turn under a flood
            try:
                msg, peer = self._udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ICMP port unreachable from an earlier answer
                continue
            udp = self._udp

            def send(
                data: bytes, udp: socket.socket = udp, peer: tuple[object, ...] = peer
            ) -> None:
                with contextlib.suppress(OSError):
                    udp.sendto(data, peer)

            self._handle(msg, "udp", send)

    def _on_accept(self) -> None:
        assert self._tcp is not None and self._selector is not None
        for _ in range(16):
            try:
                sock, _peer = self._tcp.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                _warn(f"accept failed: {exc!r}")
                return
            sock.setblocking(False)
            conn = _TcpConn(sock)
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _on_tcp_read(self, conn: _TcpConn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_conn(conn)
            return
        conn.inbuf += data
        if len(conn.inbuf) > MAX_TCP_BUFFER:
            self._close_conn(conn)
            return
        while len(conn.inbuf) >= 2:
            (length,) = struct.unpack_from("!H", conn.inbuf)
            if len(conn.inbuf) < 2 + length:
                break
            msg = bytes(conn.inbuf[2 : 2 + length])
            del conn.inbuf[: 2 + length]

            def send(data: bytes, conn: _TcpConn = conn) -> None:
                if not conn.closed:
                    conn.outbuf += struct.pack("!H", len(data)) + data
                    self._flush(conn)

            self._handle(msg, "tcp", send)

    def _flush(self, conn: _TcpConn) -> None:
        assert self._selector is not None
        try:
            while conn.outbuf:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close_conn(conn)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        self._selector.modify(conn.sock, events, conn)

    def _close_conn(self, conn: _TcpConn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn.sock.fileno(), None)
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
        conn.sock.close()

    def _close_all(self) -> None:
        for conn in list(self._conns.values()):
            self._close_conn(conn)
        self._timers.clear()
        if self._selector is not None:
            self._selector.close()
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    # ----- answering -------------------------------------------------------------------

    def _handle(self, msg: bytes, transport: str, send: Callable[[bytes], None]) -> None:
        """Parse, log and answer one query (now, later, or never)."""
        try:
            qid, flags, question = _parse_query(msg)
        except FormatError:
            with self._lock:
                self.malformed += 1
            if len(msg) >= HEADER.size and not msg[2] & 0x80:
                qid, flags = struct.unpack_from("!HH", msg)
                send(_header(qid, flags, FORMERR, 0, 0, 0))
            return
        if flags & 0x8000:  # a response, not a query: never answer those
            with self._lock:
                self.malformed += 1
            return
        name = question.name
        with self._logged:
            self._log.append(
                QueryLogEntry(time.monotonic(), transport, name, _type_name(question.qtype))
            )
            self._logged.notify_all()
            dropped = name in self._dropped or None in self._dropped
            truncated = transport == "udp" and (name in self._truncated or None in self._truncated)
            delay = self._delays.get(name, self._delays.get(None, 0.0))
            opcode = (flags >> 11) & 0xF
            answer = self._resolve(question) if opcode == 0 else _Answer(NOTIMP, [], None)
        if dropped:
            return
        response = _encode(qid, flags, question, answer, truncated)
        if transport == "udp" and len(response) > UDP_LIMIT:
            response = _encode(qid, flags, question, answer, truncated=True)
        if delay > 0:
            due = time.monotonic() + delay
            heapq.heappush(self._timers, _Pending(due, next(self._seq), lambda: send(response)))
        else:
            send(response)

    def _resolve(self, question: _Question) -> _Answer:
        """The answer for a question, from the zone as it is now (lock held)."""
        name = question.name
        owner = question.raw_labels
        answers: list[tuple[tuple[bytes, ...], _Record]] = []
        seen: set[str] = set()
        while True:
            rcode = self._rcodes.get(name, self._rcodes.get(None))
            if rcode is not None and rcode != NOERROR:
                soa = self._soa(name, owner) if rcode == NXDOMAIN else None
                return _Answer(rcode, answers, soa)
            records = self._records.get(name, [])
            wanted = [r for r in records if question.qtype in (r.rtype, ANY)]
            if wanted:
                answers += [(owner, r) for r in wanted]
                return _Answer(NOERROR, answers, None)
            cnames = [r for r in records if r.rtype == CNAME]
            if cnames and len(seen) < CNAME_CHAIN_LIMIT and name not in seen:
                seen.add(name)
                answers.append((owner, cnames[0]))
                name = cnames[0].value
                owner = _labels(name)
                if name not in self._records and self._rcodes.get(name) is None:
                    # The target is outside this zone: a chain that ends here.
                    return _Answer(NOERROR, answers, None)
                continue
            if records or answers:
                return _Answer(NOERROR, answers, self._soa(name, owner))
            return _Answer(NXDOMAIN, answers, self._soa(name, owner))

    def _soa(self, name: str, owner: tuple[bytes, ...]) -> tuple[tuple[bytes, ...], int]:
        ttl = self._negative_ttls.get(name, self.negative_ttl)
        return (owner[1:] if len(owner) > 1 else owner), ttl


def _header(qid: int, query_flags: int, rcode: int, qd: int, an: int, ns: int) -> bytes:
    # QR, the query's opcode and RD, AA and RA set; TC is or-ed in by the caller.
    flags = 0x8000 | (query_flags & 0x7900) | 0x0400 | 0x0080 | rcode
    return HEADER.pack(qid, flags, qd, an, ns, 0)


def _encode(
    qid: int, query_flags: int, question: _Question, answer: _Answer, truncated: bool
) -> bytes:
    out = _Writer()
    records = [] if truncated else answer.answers
    soa = None if truncated else answer.soa
    out.buf += _header(qid, query_flags, answer.rcode, 1, len(records), 1 if soa else 0)
    if truncated:
        out.buf[2] |= 0x02  # TC
    out.name(question.raw_labels)
    out.buf += struct.pack("!HH", question.qtype, question.qclass)
    for owner, record in records:
        out.rr(owner, record.rtype, record.ttl, _rdata(out, record))
    if soa is not None:
        zone, ttl = soa

        def soa_rdata() -> None:
            out.name((b"ns", *zone))
            out.name((b"hostmaster", *zone))
            out.buf += struct.pack("!IIIII", 1, 3600, 600, 86400, ttl)

        out.rr(zone, SOA, ttl, soa_rdata)
    return bytes(out.buf)


def _rdata(out: _Writer, record: _Record) -> Callable[[], None]:
    def write() -> None:
        if record.rtype == A:
            out.buf += socket.inet_pton(socket.AF_INET, record.value)
        elif record.rtype == AAAA:
            out.buf += socket.inet_pton(socket.AF_INET6, record.value)
        elif record.rtype == TXT:  # a name with only TXT: NODATA for A and AAAA
            data = record.value.encode()
            out.buf += bytes([len(data)]) + data
        else:
            out.name(_labels(record.value))

    return write


def _warn(text: str) -> None:
    print(f"tests.dnsserver: {text}", file=sys.stderr)
