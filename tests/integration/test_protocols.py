"""UDP ASSOCIATE, BIND and SOCKS4/4a through a real socksd, with real clients.

The raw SOCKS bytes are built by hand (RFC 1928 sections 4, 6, 7; the SOCKS4 and 4a
papers), independently of socksd's codecs; PySocks and curl are the independent
implementations.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading

import pytest
import socks  # PySocks

from socksd.passwords import hash_password
from tests.conftest import need
from tests.integration.conftest import HTTP_BODY, ipv6_available
from tests.integration.helpers import (
    TIMEOUT,
    TargetServer,
    echo,
    encode_request,
    read_reply,
    recv_exact,
)


class UdpEcho:
    """A UDP server answering every datagram with b"echo:" + payload; records senders."""

    def __init__(self, host: str = "127.0.0.1", answer=None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()[:2]
        self.senders: list[tuple[str, int]] = []
        self.answer = answer or (lambda data: b"echo:" + data)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.senders.append(addr[:2])
            reply = self.answer(data)
            if reply is not None:
                self.sock.sendto(reply, addr)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def udp_header(host: str, port: int, frag: int = 0) -> bytes:
    if ":" in host:
        addr = b"\x04" + socket.inet_pton(socket.AF_INET6, host)
    else:
        try:
            addr = b"\x01" + socket.inet_aton(host)
        except OSError:
            addr = b"\x03" + bytes([len(host)]) + host.encode()
    return b"\x00\x00" + bytes([frag]) + addr + struct.pack(">H", port)


def parse_udp_header(data: bytes) -> tuple[str, int, bytes]:
    assert data[:3] == b"\x00\x00\x00"
    if data[3] == 1:
        host, rest = socket.inet_ntoa(data[4:8]), data[8:]
    else:
        assert data[3] == 4
        host, rest = socket.inet_ntop(socket.AF_INET6, data[4:20]), data[20:]
    return host, struct.unpack(">H", rest[:2])[0], rest[2:]


def associate(proxy: tuple[str, int], announce: tuple[str, int]) -> tuple[socket.socket, str, int]:
    """TCP control connection + UDP ASSOCIATE; returns it and the relay address."""
    family = socket.AF_INET6 if ":" in proxy[0] else socket.AF_INET
    ctl = socket.socket(family, socket.SOCK_STREAM)
    ctl.settimeout(TIMEOUT)
    ctl.connect(proxy)
    ctl.sendall(b"\x05\x01\x00")
    assert recv_exact(ctl, 2) == b"\x05\x00"
    ctl.sendall(encode_request(announce[0], announce[1], cmd=3))
    rep, host, port = read_reply(ctl)
    assert rep == 0
    return ctl, host, port


def udp_client(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(2.0)
    return sock


# -- UDP ASSOCIATE --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_udp_echo_leaves_from_the_ingress_ip(spawn, family):
    if family == "ipv6":
        need(ipv6_available(), "IPv6 loopback (::1)")
        listen, client_ip, target_ip = "[::1]:0", "::1", "::1"
    else:
        listen, client_ip, target_ip = "127.0.0.2:0", "127.0.0.1", "127.0.0.1"
    target = UdpEcho(target_ip)
    proxy = spawn(f'listen = ["{listen}"]\nworkers = 1\n')
    try:
        client = udp_client(client_ip)
        ctl, relay_host, relay_port = associate(proxy.address, client.getsockname()[:2])
        assert relay_host == proxy.address[0], "the relay socket is on the ingress IP"
        for i in range(20):
            payload = b"datagram %d" % i
            client.sendto(udp_header(*target.address) + payload, (relay_host, relay_port))
            data, src = client.recvfrom(65535)
            assert src[:2] == (relay_host, relay_port)
            host, port, body = parse_udp_header(data)
            assert (host, port) == target.address and body == b"echo:" + payload
        assert {s[0] for s in target.senders} == {proxy.address[0]}, "egress = ingress IP"
        assert len({s[1] for s in target.senders}) == 1, "one egress port per association"
        ctl.close()
        closed = proxy.wait_for("tunnel_closed", lambda e: e.get("command") == "udp_associate")
        assert closed["reason"] == "eof"
        assert closed["datagrams_up"] == 20 and closed["datagrams_down"] == 20
        client.close()
    finally:
        target.close()


def _dns_query(name: str, qid: int = 0x1234) -> bytes:
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return header + qname + struct.pack(">HH", 1, 1)


def _dns_answer(query: bytes) -> bytes:
    """A responder for the test: every A question gets 192.0.2.53."""
    qid, _, qd, _, _, _ = struct.unpack(">HHHHHH", query[:12])
    end = query.index(b"\x00", 12) + 5
    header = struct.pack(">HHHHHH", qid, 0x8180, 1, 1, 0, 0)
    answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton("192.0.2.53")
    return header + query[12:end] + answer


def test_udp_dns_query_to_a_local_responder(spawn):
    dns = UdpEcho("127.0.0.1", answer=_dns_answer)
    proxy = spawn('listen = ["127.0.0.1:0"]\nworkers = 1\n')
    try:
        client = udp_client("127.0.0.1")
        ctl, rh, rp = associate(proxy.address, ("0.0.0.0", 0))  # address not known yet
        client.sendto(udp_header(*dns.address) + _dns_query("example.test"), (rh, rp))
        data, _ = client.recvfrom(65535)
        _, _, body = parse_udp_header(data)
        qid, flags, _, ancount = struct.unpack(">HHHH", body[:8])
        assert qid == 0x1234 and flags & 0x8000 and ancount == 1
        assert body[-4:] == socket.inet_aton("192.0.2.53")
        ctl.close()
        client.close()
    finally:
        dns.close()


def test_udp_drops_fragments_and_other_sources_and_denied_targets(spawn):
    target = UdpEcho("127.0.0.1")
    proxy = spawn('listen = ["127.0.0.1:0"]\nworkers = 1\n', allow_loopback_targets=False)
    allowed = spawn(
        'listen = ["127.0.0.1:0"]\nworkers = 1\n'
        '[[access.destinations]]\naction = "allow"\n'
        f'to = ["127.0.0.1"]\nports = [{target.address[1]}]\n',
        allow_loopback_targets=False,
    )
    try:
        # Default rules: a datagram to loopback is dropped, never sent.
        client = udp_client("127.0.0.1")
        ctl, rh, rp = associate(proxy.address, client.getsockname()[:2])
        client.sendto(udp_header(*target.address) + b"x", (rh, rp))
        ev = proxy.wait_for("destination_denied")
        assert ev["rule"] == "default:loopback"
        ctl.close()
        client.close()
        # Allowed target: FRAG != 0 and a second sender are dropped; the client is served.
        client = udp_client("127.0.0.1")
        intruder = udp_client("127.0.0.1")
        ctl, rh, rp = associate(allowed.address, ("0.0.0.0", 0))
        client.sendto(udp_header(*target.address) + b"first", (rh, rp))
        assert parse_udp_header(client.recvfrom(65535)[0])[2] == b"echo:first"
        client.sendto(udp_header(*target.address, frag=1) + b"fragment", (rh, rp))
        intruder.sendto(udp_header(*target.address) + b"intruder", (rh, rp))
        client.sendto(udp_header(*target.address) + b"last", (rh, rp))
        assert parse_udp_header(client.recvfrom(65535)[0])[2] == b"echo:last"
        with pytest.raises(TimeoutError):
            intruder.recvfrom(65535)
        ctl.close()
        closed = allowed.wait_for("tunnel_closed", lambda e: e.get("command") == "udp_associate")
        assert closed["dropped"] == {"fragmented": 1, "wrong_source": 1}
        assert closed["datagrams_up"] == 2
        assert len(target.senders) == 2, "only the two good datagrams reached the target"
        client.close()
        intruder.close()
    finally:
        target.close()


def test_udp_with_pysocks_client(spawn):
    target = UdpEcho("127.0.0.1")
    proxy = spawn('listen = ["127.0.0.1:0"]\nworkers = 1\n')
    try:
        s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
        s.set_proxy(socks.SOCKS5, *proxy.address)
        s.settimeout(TIMEOUT)
        s.bind(("127.0.0.1", 0))
        s.sendto(b"hello pysocks", target.address)
        data, src = s.recvfrom(65535)
        assert data == b"echo:hello pysocks" and src[:2] == target.address
        s.close()
    finally:
        target.close()


def test_udp_association_counts_a_port_per_egress_ip(spawn):
    target = UdpEcho("127.0.0.1")
    proxy = spawn('listen = ["127.0.0.1:0"]\nworkers = 1\n')
    try:
        client = udp_client("127.0.0.1")
        ctl, rh, rp = associate(proxy.address, client.getsockname()[:2])
        client.sendto(udp_header(*target.address) + b"x", (rh, rp))
        client.recvfrom(65535)
        stats = proxy.egress_stats()
        (ip,) = [i for i in stats["ips"] if i["ip"] == "127.0.0.1"]
        assert ip["udp_open"] == 1
        ctl.close()
        client.close()
    finally:
        target.close()


# -- BIND -----------------------------------------------------------------------------------


def _bind(proxy: tuple[str, int], expected: str) -> tuple[socket.socket, str, int]:
    ctl = socket.create_connection(proxy, timeout=TIMEOUT)
    ctl.sendall(b"\x05\x01\x00")
    assert recv_exact(ctl, 2) == b"\x05\x00"
    ctl.sendall(encode_request(expected, 0, cmd=2))
    rep, host, port = read_reply(ctl)
    assert rep == 0
    return ctl, host, port


def test_bind_ftp_style_active_connection(spawn):
    proxy = spawn('listen = ["127.0.0.2:0"]\nworkers = 1\n')
    ctl, host, port = _bind(proxy.address, "127.0.0.1")
    assert host == "127.0.0.2", "the listener is on the ingress IP"
    # An unexpected peer is turned away; the expected one gets through.
    stranger = socket.create_connection(
        (host, port), timeout=TIMEOUT, source_address=("127.0.0.9", 0)
    )
    try:
        assert stranger.recv(1) == b""
    except ConnectionResetError:
        pass
    stranger.close()
    server = socket.create_connection(
        (host, port), timeout=TIMEOUT, source_address=("127.0.0.1", 0)
    )
    rep, peer_host, peer_port = read_reply(ctl)
    assert rep == 0 and (peer_host, peer_port) == server.getsockname()[:2]
    server.sendall(b"220 data from the server")
    assert recv_exact(ctl, 24) == b"220 data from the server"
    ctl.sendall(b"STOR from the client")
    assert recv_exact(server, 20) == b"STOR from the client"
    server.close()
    assert ctl.recv(1) == b""
    ctl.close()
    closed = proxy.wait_for("tunnel_closed", lambda e: e.get("command") == "bind")
    assert closed["bytes_up"] == 20 and closed["bytes_down"] == 24


def test_bind_times_out_with_a_reply(spawn):
    proxy = spawn('listen = ["127.0.0.1:0"]\nworkers = 1\n[timeouts]\nbind = 0.5\n')
    ctl, _, _ = _bind(proxy.address, "0.0.0.0")
    assert read_reply(ctl)[0] == 0x06
    ctl.close()
    assert proxy.wait_for("tunnel_closed", lambda e: e.get("command") == "bind")["reason"] == (
        "bind_timeout"
    )


# -- SOCKS4 / 4a ----------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--socks4", "--socks4a"])
def test_curl_socks4_and_4a(spawn, http_target, flag):
    need(shutil.which("curl") is not None, "curl")
    proxy = spawn('listen = ["127.0.0.1:0"]\nworkers = 1\nprotocols = ["socks5", "socks4"]\n')
    host = "localhost" if flag == "--socks4a" else "127.0.0.1"
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            flag,
            "{}:{}".format(*proxy.address),
            f"http://{host}:{http_target}/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.encode() == HTTP_BODY
    closed = proxy.wait_for("tunnel_closed")
    assert closed["protocol"] == "socks4" and closed["reply"] == 0


def test_socks4_off_by_default_and_userid_checked_with_auth(spawn):
    target = TargetServer(echo)
    try:
        proxy = spawn('listen = ["127.0.0.1:0"]\nworkers = 1\n')
        s = socket.create_connection(proxy.address, timeout=TIMEOUT)
        s.sendall(
            b"\x04\x01" + struct.pack(">H", target.port) + socket.inet_aton("127.0.0.1") + b"\x00"
        )
        assert s.recv(8) == b""
        s.close()
        h = hash_password("pw")
        authed = spawn(
            'listen = ["127.0.0.1:0"]\nworkers = 1\nprotocols = ["socks5", "socks4"]\n'
            f'[auth]\nmethod = "password"\n[auth.users]\nalice = "{h}"\n'
        )
        for userid, code in ((b"mallory", 91), (b"alice", 90)):
            s = socket.create_connection(authed.address, timeout=TIMEOUT)
            req = b"\x04\x01" + struct.pack(">H", target.port) + socket.inet_aton("127.0.0.1")
            s.sendall(req + userid + b"\x00")
            assert recv_exact(s, 8)[1] == code, userid
            if code == 90:
                s.sendall(b"ping")
                assert recv_exact(s, 4) == b"ping"
            s.close()
        assert authed.wait_for("tunnel_closed")["reason"] == "socks4_unknown_user"
    finally:
        target.close()


def test_socks4_bind(spawn):
    proxy = spawn('listen = ["127.0.0.1:0"]\nworkers = 1\nprotocols = ["socks4"]\n')
    ctl = socket.create_connection(proxy.address, timeout=TIMEOUT)
    ctl.sendall(b"\x04\x02" + struct.pack(">H", 21) + socket.inet_aton("127.0.0.1") + b"u\x00")
    first = recv_exact(ctl, 8)
    assert first[1] == 90
    port = struct.unpack(">H", first[2:4])[0]
    server = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    second = recv_exact(ctl, 8)
    assert second[1] == 90 and struct.unpack(">H", second[2:4])[0] == server.getsockname()[1]
    server.sendall(b"hi")
    assert recv_exact(ctl, 2) == b"hi"
    server.close()
    ctl.close()
    # socks5 is off in this config: a SOCKS5 greeting is refused.
    s = socket.create_connection(proxy.address, timeout=TIMEOUT)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b""
    s.close()


def test_udp_large_datagram_intact(spawn):
    """Near the IPv4 maximum: the shared 64 KiB buffer holds datagram and header."""
    target = UdpEcho("127.0.0.1")
    proxy = spawn('listen = ["127.0.0.1:0"]\nworkers = 1\n')
    try:
        client = udp_client("127.0.0.1")
        ctl, rh, rp = associate(proxy.address, client.getsockname()[:2])
        payload = bytes(range(256)) * 234  # 59,904 bytes
        client.sendto(udp_header(*target.address) + payload, (rh, rp))
        _, _, body = parse_udp_header(client.recvfrom(65535)[0])
        assert body == b"echo:" + payload
        ctl.close()
        client.close()
    finally:
        target.close()


def test_udp_only_the_clients_ip_and_solicited_targets(spawn):
    """A NAT-ed client announces an address that is not its own: its IP still wins.
    A host the client never sent to cannot reach it through the egress port."""
    target = UdpEcho("127.0.0.1")
    proxy = spawn('listen = ["127.0.0.1:0"]\nworkers = 1\n')
    try:
        client = udp_client("127.0.0.1")
        ctl, rh, rp = associate(proxy.address, ("192.0.2.7", 4000))  # not its address
        client.sendto(udp_header(*target.address) + b"hi", (rh, rp))
        assert parse_udp_header(client.recvfrom(65535)[0])[2] == b"echo:hi"
        egress_port = target.senders[-1][1]
        stranger = udp_client("127.0.0.1")
        stranger.sendto(b"unsolicited", ("127.0.0.1", egress_port))
        client.sendto(udp_header(*target.address) + b"again", (rh, rp))
        assert parse_udp_header(client.recvfrom(65535)[0])[2] == b"echo:again"
        with pytest.raises(TimeoutError):
            client.recvfrom(65535)
        ctl.close()
        closed = proxy.wait_for("tunnel_closed", lambda e: e.get("command") == "udp_associate")
        assert closed["dropped"] == {"unsolicited": 1}
        client.close()
        stranger.close()
    finally:
        target.close()
