"""tests/dnsserver.py answers as a DNS server must, to a real resolver and to raw queries.

The resolver is c-ares through pycares, the library socksd's resolver is built on, so these
tests also pin the pycares behaviour that socksd relies on (TTLs, error codes, TCP fallback,
driving a channel from our own selector loop). The raw queries are built by hand here from
RFC 1035, independently of the server's encoder, so neither can hide the other's bug.
Each pycares lookup uses a fresh Channel: c-ares caches answers per channel (qcache), and a
cached answer would never reach the server.
"""

from __future__ import annotations

import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import need
from tests.dnsserver import (
    NXDOMAIN,
    REFUSED,
    SERVFAIL,
    DNSServer,
    FormatError,
    _read_name,
)

try:
    import pycares

    HAVE_PYCARES = True
except ImportError:  # pragma: no cover - the test extra installs it
    HAVE_PYCARES = False

TIMEOUT = 5.0
ARES_FLAG_DNS0x20 = 1 << 10  # c-ares 1.34 ares.h; pycares 5.2.1 does not export it


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer() as server:
        yield server


def resolve(
    server: DNSServer,
    name: str,
    qtype: str = "A",
    *,
    timeout: float = 1.0,
    tries: int = 1,
    **kw: Any,
) -> tuple[Any, int | None, float]:
    """(result, error code or None, seconds) of one pycares query on a fresh channel."""
    need(HAVE_PYCARES, "pycares is not installed (pip install '.[test]')")
    channel = pycares.Channel(servers=[server.nameserver], timeout=timeout, tries=tries, **kw)
    done = threading.Event()
    out: dict[str, Any] = {}

    def callback(result: Any, error: int | None) -> None:
        out["result"], out["error"] = result, error
        done.set()

    start = time.monotonic()
    try:
        channel.query(name, getattr(pycares, f"QUERY_TYPE_{qtype}"), callback=callback)
        assert done.wait(TIMEOUT), f"pycares never called back for {name} {qtype}"
    finally:
        channel.close()
    return out["result"], out["error"], time.monotonic() - start


def records(result: Any) -> list[tuple[str, int, int, str]]:
    """(lower-case owner, type, ttl, data) of each answer record of a pycares result."""
    rows = []
    for rr in result.answer:
        data = getattr(rr.data, "addr", None) or rr.data.cname
        rows.append((rr.name.lower(), rr.type, rr.ttl, data))
    return rows


def test_c_ares_caches_per_channel_except_servfail(dns: DNSServer) -> None:
    """Pinned because socksd's own cache sits on top of it: c-ares 1.34 has a query cache
    on by default (pycares 5.2.1 cannot turn it off), answers hits synchronously inside
    query() in the caller's thread, caches NXDOMAIN/NODATA for the SOA's negative TTL,
    and never caches SERVFAIL, which is what serve-stale has to see."""
    need(HAVE_PYCARES, "pycares is not installed (pip install '.[test]')")
    dns.add("www.example.test", "A", "192.0.2.1", ttl=60)
    dns.set_rcode("broken.example.test", SERVFAIL)
    dns.set_negative_ttl(None, 60)
    channel = pycares.Channel(servers=[dns.nameserver], timeout=1.0, tries=1)
    try:
        for name in ("www.example.test", "nope.example.test", "broken.example.test"):
            threads: list[threading.Thread] = []
            for _ in range(2):
                done = threading.Event()

                def callback(
                    result: Any,
                    error: int | None,
                    done: threading.Event = done,
                    threads: list[threading.Thread] = threads,
                ) -> None:
                    threads.append(threading.current_thread())
                    done.set()

                channel.query(name, pycares.QUERY_TYPE_A, callback=callback)
                assert done.wait(TIMEOUT)
            cached = name != "broken.example.test"
            assert dns.queries(name) == (1 if cached else 2), name
            assert (threads[1] is threading.current_thread()) == cached, name
    finally:
        channel.close()


# ----- raw wire format, written from RFC 1035 ---------------------------------------------


def build_query(name: str, qtype: int, qid: int = 0x1234, edns: bool = False) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    opt = b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0) if edns else b""
    return header + qname + struct.pack("!HH", qtype, 1) + opt


def parse_name(msg: bytes, offset: int) -> tuple[str, int]:
    parts: list[str] = []
    end = None
    while msg[offset]:
        if msg[offset] >= 0xC0:
            end = end or offset + 2
            offset = struct.unpack_from("!H", msg, offset)[0] & 0x3FFF
            continue
        parts.append(msg[offset + 1 : offset + 1 + msg[offset]].decode())
        offset += 1 + msg[offset]
    return ".".join(parts), end or offset + 1


def parse_response(msg: bytes) -> dict[str, Any]:
    qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", msg)
    offset = 12
    question = None
    for _ in range(qd):
        qname, offset = parse_name(msg, offset)
        question = (qname, *struct.unpack_from("!HH", msg, offset))
        offset += 4
    sections: list[list[tuple[str, int, int, Any]]] = [[], []]
    for section, count in zip(sections, (an, ns), strict=True):
        for _ in range(count):
            owner, offset = parse_name(msg, offset)
            rtype, _cls, ttl, rdlen = struct.unpack_from("!HHIH", msg, offset)
            offset += 10
            rdata: Any = msg[offset : offset + rdlen]
            if rtype == 1:
                rdata = socket.inet_ntop(socket.AF_INET, rdata)
            elif rtype == 28:
                rdata = socket.inet_ntop(socket.AF_INET6, rdata)
            elif rtype == 5:
                rdata = parse_name(msg, offset)[0]
            elif rtype == 6:
                rdata = struct.unpack_from("!IIIII", msg, offset + rdlen - 20)  # ..., MINIMUM
            section.append((owner, rtype, ttl, rdata))
            offset += rdlen
    return {
        "id": qid,
        "tc": bool(flags & 0x0200),
        "aa": bool(flags & 0x0400),
        "rcode": flags & 0xF,
        "question": question,
        "answer": sections[0],
        "authority": sections[1],
        "arcount": ar,
    }


def udp_exchange(server: DNSServer, query: bytes) -> bytes:
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.sendto(query, server.address)
        return sock.recv(65535)


def tcp_connect(server: DNSServer) -> socket.socket:
    sock = socket.create_connection(server.address, timeout=TIMEOUT)
    return sock


def tcp_read(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "server closed the TCP connection"
            data += chunk
        return data

    (length,) = struct.unpack("!H", exactly(2))
    return exactly(length)


def framed(query: bytes) -> bytes:
    return struct.pack("!H", len(query)) + query


# ----- answers to a real resolver --------------------------------------------------------


def test_a_and_aaaa_carry_the_ttls_set(dns: DNSServer) -> None:
    dns.add("www.example.test", "A", "192.0.2.1", ttl=60)
    dns.add("www.example.test", "A", "192.0.2.2", ttl=60)
    dns.add("www.example.test", "AAAA", "2001:db8::1", ttl=120)
    result, error, _ = resolve(dns, "www.example.test", "A")
    assert error is None
    assert sorted(records(result)) == [
        ("www.example.test", 1, 60, "192.0.2.1"),
        ("www.example.test", 1, 60, "192.0.2.2"),
    ]
    result, error, _ = resolve(dns, "WWW.example.test.", "AAAA")
    assert error is None
    assert records(result) == [("www.example.test", 28, 120, "2001:db8::1")]


def test_cname_chain_is_followed_and_returned_in_full(dns: DNSServer) -> None:
    dns.add("alias.example.test", "CNAME", "mid.example.test", ttl=30)
    dns.add("mid.example.test", "CNAME", "www.example.test", ttl=40)
    dns.add("www.example.test", "A", "192.0.2.1", ttl=50)
    result, error, _ = resolve(dns, "alias.example.test", "A")
    assert error is None
    assert records(result) == [
        ("alias.example.test", 5, 30, "mid.example.test"),
        ("mid.example.test", 5, 40, "www.example.test"),
        ("www.example.test", 1, 50, "192.0.2.1"),
    ]
    assert dns.queries() == 1  # one question, the whole chain in one answer


def test_nxdomain_nodata_servfail_refused_surface_as_ares_errors(dns: DNSServer) -> None:
    dns.add("v4only.example.test", "A", "192.0.2.9")
    dns.set_rcode("broken.example.test", SERVFAIL)
    dns.set_rcode("closed.example.test", REFUSED)
    dns.add("gone.example.test", "A", "192.0.2.10")
    dns.set_rcode("gone.example.test", NXDOMAIN)  # an rcode wins over the name's records
    cases = [
        ("missing.example.test", "A", "ARES_ENOTFOUND"),
        ("gone.example.test", "A", "ARES_ENOTFOUND"),
        ("v4only.example.test", "AAAA", "ARES_ENODATA"),
        ("broken.example.test", "A", "ARES_ESERVFAIL"),
        ("closed.example.test", "A", "ARES_EREFUSED"),
    ]
    for name, qtype, expected in cases:
        result, error, _ = resolve(dns, name, qtype)
        assert result is None  # pycares drops the response (and its SOA) on any error
        assert error == getattr(pycares.errno, expected), (name, qtype, error)
    assert dns.queries("broken.example.test") == 1  # tries=1: no retry


def test_negative_answers_carry_an_soa_with_the_negative_ttl(dns: DNSServer) -> None:
    dns.add("v4only.example.test", "A", "192.0.2.9")
    dns.set_negative_ttl("v4only.example.test", 7)
    dns.set_negative_ttl(None, 42)
    nodata = parse_response(udp_exchange(dns, build_query("v4only.example.test", 28)))
    assert (nodata["rcode"], nodata["answer"]) == (0, [])
    [(owner, rtype, ttl, soa)] = nodata["authority"]
    assert (owner, rtype, ttl, soa[-1]) == ("example.test", 6, 7, 7)

    nxdomain = parse_response(udp_exchange(dns, build_query("nope.example.test", 1)))
    assert (nxdomain["rcode"], nxdomain["answer"]) == (NXDOMAIN, [])
    [(_, rtype, ttl, soa)] = nxdomain["authority"]
    assert (rtype, ttl, soa[-1]) == (6, 42, 42)

    dns.set_rcode("broken.example.test", SERVFAIL)
    servfail = parse_response(udp_exchange(dns, build_query("broken.example.test", 1)))
    assert (servfail["rcode"], servfail["answer"], servfail["authority"]) == (SERVFAIL, [], [])


def test_delay_holds_one_name_while_others_are_answered(dns: DNSServer) -> None:
    dns.add("slow.example.test", "A", "192.0.2.1", ttl=5)
    dns.add("fast.example.test", "A", "192.0.2.2", ttl=5)
    dns.set_delay("slow.example.test", 1.0)
    slow: dict[str, Any] = {}

    def lookup_slow() -> None:
        slow["out"] = resolve(dns, "slow.example.test", timeout=3.0)

    thread = threading.Thread(target=lookup_slow)
    thread.start()
    try:
        assert dns.wait_queries(1, "slow.example.test", timeout=TIMEOUT)
        result, error, took = resolve(dns, "fast.example.test", timeout=3.0)
        assert error is None and records(result)[0][3] == "192.0.2.2"
        assert took < 0.5
    finally:
        thread.join(TIMEOUT)
    result, error, took = slow["out"]
    assert error is None and records(result)[0][3] == "192.0.2.1"
    assert 0.9 <= took < 2.5
    assert dns.queries("slow.example.test") == 1  # answered late, not retried


def test_a_dropped_name_times_out(dns: DNSServer) -> None:
    dns.add("void.example.test", "A", "192.0.2.1")
    dns.drop("void.example.test")
    result, error, took = resolve(dns, "void.example.test", timeout=0.3, tries=2)
    assert (result, error) == (None, pycares.errno.ARES_ETIMEOUT)
    assert took < 2.0
    assert dns.queries("void.example.test", transport="udp") == 2  # each try reached it


def test_truncation_makes_the_resolver_retry_over_tcp(dns: DNSServer) -> None:
    dns.add("big.example.test", "A", "192.0.2.77", ttl=33)
    dns.truncate("big.example.test")
    result, error, _ = resolve(dns, "big.example.test")
    assert error is None
    assert records(result) == [("big.example.test", 1, 33, "192.0.2.77")]
    assert dns.queries("big.example.test", "A", "udp") == 1
    assert dns.queries("big.example.test", "A", "tcp") == 1
    assert [entry.transport for entry in dns.log] == ["udp", "tcp"]

    over_udp = parse_response(udp_exchange(dns, build_query("big.example.test", 1)))
    assert over_udp["tc"] and over_udp["answer"] == [] and over_udp["rcode"] == 0
    with tcp_connect(dns) as sock:
        sock.sendall(framed(build_query("big.example.test", 1)))
        over_tcp = parse_response(tcp_read(sock))
    assert not over_tcp["tc"]
    assert over_tcp["answer"] == [("big.example.test", 1, 33, "192.0.2.77")]


def test_question_case_is_echoed_for_dns0x20(dns: DNSServer) -> None:
    dns.add("www.example.test", "A", "192.0.2.1")
    response = parse_response(udp_exchange(dns, build_query("wWw.ExAmple.TEST", 1)))
    assert response["question"] == ("wWw.ExAmple.TEST", 1, 1)
    assert response["answer"] == [("wWw.ExAmple.TEST", 1, 300, "192.0.2.1")]
    # c-ares with DNS 0x20 randomises the case and rejects answers that do not echo it.
    result, error, _ = resolve(dns, "www.example.test", flags=ARES_FLAG_DNS0x20)
    assert error is None and records(result)[0][3] == "192.0.2.1"
    assert dns.queries("WWW.EXAMPLE.TEST.") == 2


def test_counters_by_name_type_and_transport(dns: DNSServer) -> None:
    dns.add("a.example.test", "A", "192.0.2.1")
    dns.add("b.example.test", "AAAA", "2001:db8::2")
    udp_exchange(dns, build_query("a.example.test", 1))
    udp_exchange(dns, build_query("A.Example.Test", 28))
    with tcp_connect(dns) as sock:
        sock.sendall(framed(build_query("b.example.test", 28)))
        tcp_read(sock)
    assert dns.queries() == 3
    assert dns.queries("a.example.test.") == 2
    assert dns.queries("a.example.test", "A") == 1
    assert dns.queries("a.example.test", 28) == 1
    assert dns.queries(qtype="AAAA") == 2
    assert dns.queries(transport="tcp") == 1
    assert dns.queries("b.example.test", "AAAA", "udp") == 0
    log = dns.log
    assert [(e.transport, e.name, e.qtype) for e in log] == [
        ("udp", "a.example.test", "A"),
        ("udp", "a.example.test", "AAAA"),
        ("tcp", "b.example.test", "AAAA"),
    ]
    assert log[0].time <= log[1].time <= log[2].time <= time.monotonic()
    dns.reset_counts()
    assert dns.queries() == 0 and dns.log == []
    assert not dns.wait_queries(1, timeout=0.05)


def test_clear_forgets_the_zone_and_behaviours_but_not_the_counts() -> None:
    with DNSServer(negative_ttl=9) as dns:
        dns.add("www.example.test", "A", "192.0.2.1")
        dns.set_negative_ttl(None, 99)
        dns.set_delay(None, 5.0)
        dns.truncate(None)
        dns.clear()
        reply = parse_response(udp_exchange(dns, build_query("www.example.test", 1)))
        assert (reply["rcode"], reply["tc"], reply["authority"][0][2]) == (NXDOMAIN, False, 9)
        assert dns.queries("www.example.test") == 1


# ----- raw protocol corners ---------------------------------------------------------------


def test_several_queries_on_one_tcp_connection_and_edns_is_ignored(dns: DNSServer) -> None:
    dns.add("one.example.test", "A", "192.0.2.1")
    dns.add("two.example.test", "AAAA", "2001:db8::2")
    dns.set_delay("one.example.test", 0.3)
    with tcp_connect(dns) as sock:
        sock.sendall(
            framed(build_query("one.example.test", 1, qid=1, edns=True))
            + framed(build_query("two.example.test", 28, qid=2, edns=True))
        )
        first, second = parse_response(tcp_read(sock)), parse_response(tcp_read(sock))
        sock.sendall(framed(build_query("two.example.test", 28, qid=3)))
        third = parse_response(tcp_read(sock))
    # The delayed answer comes last: the server does not answer in order on TCP.
    assert [r["id"] for r in (first, second, third)] == [2, 1, 3]
    assert second["answer"] == [("one.example.test", 1, 300, "192.0.2.1")]
    assert first["answer"] == third["answer"] == [("two.example.test", 28, 300, "2001:db8::2")]
    assert first["arcount"] == 0 and first["aa"]  # no OPT echoed


def test_garbage_gets_formerr_or_silence_and_the_server_survives(dns: DNSServer) -> None:
    dns.add("ok.example.test", "A", "192.0.2.1")
    rng = random.Random(1035)
    family = socket.AF_INET
    header = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0)
    formerr_cases = [
        struct.pack("!HHHHHH", 0xBEEF, 0x0100, 0, 0, 0, 0),  # no question
        struct.pack("!HHHHHH", 0xBEEF, 0x0100, 2, 0, 0, 0) + b"\0" + b"\0\1\0\1" * 2,
        header + b"\xc0\x0c\0\1\0\1",  # a pointer to itself
        header + b"\x05abc",  # a label past the end
        header + b"\x03www\0\0",  # question cut short
        header + b"\x80abc\0\0\1\0\1",  # reserved label type
    ]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        for case in formerr_cases:
            sock.sendto(case, dns.address)
            reply = parse_response(sock.recv(65535))
            assert (reply["id"], reply["rcode"]) == (0xBEEF, 1), case
        for _ in range(200):
            sock.sendto(rng.randbytes(rng.randrange(0, 64)), dns.address)
        sock.sendto(b"\x01", dns.address)  # no header: no answer at all
    with tcp_connect(dns) as sock:
        sock.sendall(framed(b"\xff" * 5) + framed(formerr_cases[2]))
        assert parse_response(tcp_read(sock))["rcode"] == 1
    # Still serving, over both transports.
    good = parse_response(udp_exchange(dns, build_query("ok.example.test", 1)))
    assert good["answer"] == [("ok.example.test", 1, 300, "192.0.2.1")]
    with tcp_connect(dns) as sock:
        sock.sendall(framed(build_query("ok.example.test", 1)))
        assert parse_response(tcp_read(sock))["rcode"] == 0
    assert dns.malformed >= len(formerr_cases) + 1


def test_compressed_names_are_read_and_pointer_loops_refused() -> None:
    msg = b"\0" * 12 + b"\x07example\x04test\x00" + b"\x03www\xc0\x0c"
    assert _read_name(msg, 12) == ((b"example", b"test"), 26)
    assert _read_name(msg, 26) == ((b"www", b"example", b"test"), 32)
    for bad in (b"\0" * 12 + b"\xc0\x0c", b"\0" * 12 + b"\xc0\x0e\0", b"\0" * 12 + b"\x03ab"):
        with pytest.raises(FormatError):
            _read_name(bad, 12)


def test_ipv6_loopback_and_one_port_for_both_transports() -> None:
    with DNSServer("::1") as dns:
        assert dns.nameserver == f"[::1]:{dns.port}"
        dns.add("six.example.test", "AAAA", "2001:db8::6", ttl=66)
        result, error, _ = resolve(dns, "six.example.test", "AAAA")
        assert error is None and records(result) == [("six.example.test", 28, 66, "2001:db8::6")]
        with socket.create_connection(dns.address, timeout=TIMEOUT) as sock:
            sock.sendall(framed(build_query("six.example.test", 28)))
            assert parse_response(tcp_read(sock))["answer"][0][3] == "2001:db8::6"
    with pytest.raises(ValueError, match="loopback"):
        DNSServer("0.0.0.0")


def test_stop_closes_both_sockets_and_joins(dns: DNSServer) -> None:
    port = dns.port
    idle = tcp_connect(dns)  # an open connection must not hold stop() up
    started = time.monotonic()
    dns.stop()
    assert time.monotonic() - started < 2.0
    assert not [t for t in threading.enumerate() if t.name == f"dnsserver-{port}"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
    idle.settimeout(TIMEOUT)
    assert idle.recv(1) == b""  # closed by the server
    idle.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", port))  # the UDP port is free again


# ----- pycares driven from our own loop, as socksd's workers will -------------------------


def test_pycares_channel_driven_by_a_selectors_loop(dns: DNSServer) -> None:
    """No c-ares event thread: sock_state_cb feeds a selector, process_fd drives it."""
    need(HAVE_PYCARES, "pycares is not installed (pip install '.[test]')")
    dns.add("www.example.test", "A", "192.0.2.1", ttl=60)
    dns.add("tc.example.test", "A", "192.0.2.5", ttl=61)
    dns.truncate("tc.example.test")
    dns.drop("void.example.test")
    dns.set_rcode("nx.example.test", NXDOMAIN)
    sel = selectors.DefaultSelector()
    states: list[tuple[int, bool, bool]] = []

    def sock_state(fd: int, readable: bool, writable: bool) -> None:
        states.append((fd, bool(readable), bool(writable)))
        events = (selectors.EVENT_READ if readable else 0) | (
            selectors.EVENT_WRITE if writable else 0
        )
        registered = fd in sel.get_map()
        if not events:
            if registered:
                sel.unregister(fd)
        elif registered:
            sel.modify(fd, events)
        else:
            sel.register(fd, events)

    threads_before = {t.ident for t in threading.enumerate()}
    channel = pycares.Channel(
        sock_state_cb=sock_state, servers=[dns.nameserver], timeout=0.4, tries=1
    )
    results: dict[str, tuple[Any, int | None, str]] = {}

    def callback_for(name: str) -> Any:
        def callback(result: Any, error: int | None) -> None:
            results[name] = (result, error, threading.current_thread().name)

        return callback

    names = ["www.example.test", "tc.example.test", "void.example.test", "nx.example.test"]
    try:
        for name in names:
            channel.query(name, pycares.QUERY_TYPE_A, callback=callback_for(name))
        deadline = time.monotonic() + TIMEOUT
        while len(results) < len(names) and time.monotonic() < deadline:
            events = sel.select(channel.timeout(1.0))  # type: ignore[no-untyped-call]
            if not events:  # c-ares's own timers (retries, timeouts) run from here
                channel.process_fd(pycares.ARES_SOCKET_BAD, pycares.ARES_SOCKET_BAD)
            for key, mask in events:
                channel.process_fd(
                    key.fd if mask & selectors.EVENT_READ else pycares.ARES_SOCKET_BAD,
                    key.fd if mask & selectors.EVENT_WRITE else pycares.ARES_SOCKET_BAD,
                )
        # No thread of c-ares's own appeared (pycares keeps one for closing channels).
        new_threads = [t.name for t in threading.enumerate() if t.ident not in threads_before]
        assert all("shutdown" in name for name in new_threads), new_threads
        assert not sel.get_map()  # c-ares released every socket once its queries ended
    finally:
        channel.close()
        sel.close()
    assert {name: thread for name, (_, _, thread) in results.items()} == dict.fromkeys(
        names, threading.current_thread().name
    )
    assert records(results["www.example.test"][0]) == [("www.example.test", 1, 60, "192.0.2.1")]
    assert records(results["tc.example.test"][0]) == [("tc.example.test", 1, 61, "192.0.2.5")]
    assert results["void.example.test"][1] == pycares.errno.ARES_ETIMEOUT
    assert results["nx.example.test"][1] == pycares.errno.ARES_ENOTFOUND
    assert dns.queries("tc.example.test", transport="tcp") == 1
    assert any(writable for _, _, writable in states)  # the TCP connect waited for writability
