"""Tunnel behaviour through a real socksd: bulk data, half-close, replies, egress IP."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest

from tests.integration.helpers import (
    TIMEOUT,
    TargetServer,
    encode_request,
    open_tunnel,
    read_reply,
    recv_all,
    recv_exact,
    unanswered_port,
)

SIZE = 64 * 1024 * 1024
CHUNK = 256 * 1024


def _stream(seed: bytes, size: int):
    """Deterministic pseudo-random chunks (sha256 counter mode)."""
    block = b"".join(
        hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(CHUNK // 32)
    )
    sent = 0
    while sent < size:
        n = min(CHUNK, size - sent)
        yield block[:n]
        sent += n
        block = block[1:] + block[:1]


def _digest_of(seed: bytes, size: int) -> str:
    h = hashlib.sha256()
    for chunk in _stream(seed, size):
        h.update(chunk)
    return h.hexdigest()


def test_64_mib_each_way_sha256(proxy):
    seen: dict[str, str] = {}

    def duplex(sock: socket.socket, peer: object) -> None:
        def send_down() -> None:
            for chunk in _stream(b"down", SIZE):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send_down)
        sender.start()
        h = hashlib.sha256()
        while data := sock.recv(CHUNK):
            h.update(data)
        seen["up"] = h.hexdigest()
        sender.join()

    target = TargetServer(duplex)
    try:
        sock, (rep, _, _) = open_tunnel(proxy.address, "127.0.0.1", target.port)
        assert rep == 0
        sock.settimeout(60)

        def send_up() -> None:
            for chunk in _stream(b"up", SIZE):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send_up)
        sender.start()
        h = hashlib.sha256()
        received = 0
        while data := sock.recv(CHUNK):
            h.update(data)
            received += len(data)
        sender.join()
        sock.close()
        assert received == SIZE
        assert h.hexdigest() == _digest_of(b"down", SIZE)
        closed = proxy.wait_for(
            "tunnel_closed", lambda e: e["target"] == f"127.0.0.1:{target.port}"
        )
        assert seen["up"] == _digest_of(b"up", SIZE)
        assert closed["bytes_up"] == SIZE
        assert closed["bytes_down"] == SIZE
        assert closed["reason"] == "eof"
    finally:
        target.close()


def test_half_close_client_still_receives_reply(proxy):
    def answer_after_eof(sock: socket.socket, peer: object) -> None:
        request = recv_all(sock)  # until the client's FIN arrives through the proxy
        time.sleep(0.05)  # the target thread may sleep; socksd may not
        sock.sendall(b"got:" + request)

    target = TargetServer(answer_after_eof)
    try:
        sock, (rep, _, _) = open_tunnel(proxy.address, "127.0.0.1", target.port)
        assert rep == 0
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"got:hello"
        sock.close()
    finally:
        target.close()


def test_payload_behind_request_is_relayed_not_lost(proxy, echo_target):
    s = socket.create_connection(proxy.address, timeout=TIMEOUT)
    payload = os.urandom(3000)
    # Greeting, request and first payload in one segment, before any reply.
    s.sendall(b"\x05\x01\x00" + encode_request("127.0.0.1", echo_target.port) + payload)
    assert recv_exact(s, 2) == b"\x05\x00"
    rep, _, _ = read_reply(s)
    assert rep == 0
    assert recv_exact(s, len(payload)) == payload
    s.close()


def test_egress_source_ip_is_ingress_ip(spawn):
    """Listening on 127.0.0.2 and 127.0.0.3, the target sees the IP the client used."""
    proc = spawn('listen = ["127.0.0.2:0", "127.0.0.3:0"]\nworkers = 1\n')

    def report_peer(sock: socket.socket, peer: tuple[str, int]) -> None:
        sock.sendall(f"{peer[0]}:{peer[1]}\n".encode())

    target = TargetServer(report_peer)
    try:
        for ingress in proc.listen:
            sock, (rep, bnd_addr, bnd_port) = open_tunnel(ingress, "127.0.0.1", target.port)
            assert rep == 0
            seen = recv_all(sock).decode().strip()
            sock.close()
            assert seen == f"{ingress[0]}:{bnd_port}", "target saw another source"
            assert bnd_addr == ingress[0], "BND.ADDR is not the egress address"
    finally:
        target.close()


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # bound, never listening: connects get RST


@pytest.mark.parametrize(
    ("host", "port", "code", "reason"),
    [
        ("127.0.0.1", None, 0x05, "econnrefused"),
        ("no-such-host.invalid", 80, 0x04, "dns_nxdomain"),
    ],
)
def test_failure_replies(proxy, host, port, code, reason):
    port = port or _refused_port()
    sock, (rep, _, _) = open_tunnel(proxy.address, host, port)
    assert rep == code
    assert sock.recv(1) == b"", "socksd must close after a failure reply"
    sock.close()
    closed = proxy.wait_for(
        "tunnel_closed", lambda e: e["target"].endswith(f":{port}") and e["target"].startswith(host)
    )
    assert closed["reply"] == code
    assert closed["reason"] == reason


def test_connect_timeout_replies_ttl_expired(proxy):
    # A listener with a full accept queue drops SYNs: the connect hangs until socksd's
    # connect timeout (2 s in this proxy's config).
    with unanswered_port() as port:
        started = time.monotonic()
        sock, (rep, _, _) = open_tunnel(proxy.address, "127.0.0.1", port)
        assert rep == 0x06
        assert 1.5 <= time.monotonic() - started < 6
        sock.close()
        proxy.wait_for("tunnel_closed", lambda e: e.get("reason") == "connect_timeout")


def test_unknown_command(proxy):
    s = socket.create_connection(proxy.address, timeout=TIMEOUT)
    s.sendall(b"\x05\x01\x00" + encode_request("127.0.0.1", 9, cmd=9))
    assert recv_exact(s, 2) == b"\x05\x00"
    assert read_reply(s)[0] == 0x07
    assert s.recv(1) == b""
    s.close()


def test_unknown_address_type(proxy):
    s = socket.create_connection(proxy.address, timeout=TIMEOUT)
    s.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x09" + b"\x00" * 6)
    assert recv_exact(s, 2) == b"\x05\x00"
    assert recv_exact(s, 10) == b"\x05\x08\x00\x01" + b"\x00" * 6
    assert s.recv(1) == b""
    s.close()


def test_no_acceptable_method_gets_ff(proxy):
    s = socket.create_connection(proxy.address, timeout=TIMEOUT)
    s.sendall(b"\x05\x01\x02")  # only user/pass offered; this proxy has no auth
    assert recv_exact(s, 2) == b"\x05\xff"
    assert s.recv(1) == b""
    s.close()


def test_garbage_greeting_closes_and_worker_keeps_serving(proxy, echo_target):
    bystander, (rep, _, _) = open_tunnel(proxy.address, "127.0.0.1", echo_target.port)
    assert rep == 0
    for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x04\x01\x00\x50", os.urandom(512)):
        s = socket.create_connection(proxy.address, timeout=TIMEOUT)
        s.sendall(garbage)
        try:
            rest = recv_all(s)
        except ConnectionResetError:
            rest = b""
        s.close()
        assert len(rest) <= 12  # at most one SOCKS reply, then close
    proxy.wait_for("handshake_failed", lambda e: e["reason"] == "bad_version")
    # The tunnel opened before the garbage still carries every byte.
    data = os.urandom(100_000)
    bystander.sendall(data)
    assert recv_exact(bystander, len(data)) == data
    bystander.close()


def test_wrong_password_status_then_close(spawn):
    from socksd.passwords import hash_password

    proc = spawn(
        'listen = ["127.0.0.1:0"]\nworkers = 1\n[auth]\nmethod = "password"\n'
        f'[auth.users]\nalice = "{hash_password("secret")}"\n'
    )
    for user, password in ((b"alice", b"nope"), (b"mallory", b"secret")):
        sock, (rep, _, status) = open_tunnel(proc.address, "127.0.0.1", 9, auth=(user, password))
        assert rep == -1 and status != 0
        assert sock.recv(1) == b"", "RFC 1929: the server must close after a failed status"
        sock.close()
    assert len(proc.named("handshake_failed")) >= 1


def test_handshake_timeout_frees_silent_client(proxy):
    s = socket.create_connection(proxy.address, timeout=TIMEOUT)
    started = time.monotonic()
    assert s.recv(1) == b""  # proxy handshake timeout is 1 s
    elapsed = time.monotonic() - started
    assert 0.8 <= elapsed < 5
    s.close()
    proxy.wait_for("handshake_failed", lambda e: e["reason"] == "handshake_timeout")


def test_idle_tunnel_is_closed(spawn, echo_target):
    proc = spawn('listen = ["127.0.0.1:0"]\nworkers = 1\n[timeouts]\nidle = 0.5\n')
    sock, (rep, _, _) = open_tunnel(proc.address, "127.0.0.1", echo_target.port)
    assert rep == 0
    sock.sendall(b"x")
    assert recv_exact(sock, 1) == b"x"
    started = time.monotonic()
    try:
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pass  # an idle cut is abortive: RST is the honest signal
    assert 0.4 <= time.monotonic() - started < 5
    sock.close()
    closed = proc.wait_for("tunnel_closed", lambda e: e["reason"] == "idle_timeout")
    assert closed["bytes_up"] == 1 and closed["bytes_down"] == 1


def _pipe_fds(pid: int) -> int:
    fd_dir = f"/proc/{pid}/fd"
    return sum(1 for fd in os.listdir(fd_dir) if os.readlink(f"{fd_dir}/{fd}").startswith("pipe:"))


def test_bulk_tunnels_borrow_pipes_only_while_bytes_flow(spawn, echo_target):
    """splice(2) pipes come from a per-worker pool: 20 idle tunnels that each moved
    bulk data hold no pipe of their own (idle cost stays two fds per tunnel)."""
    proc = spawn('listen = ["127.0.0.1:0"]\nworkers = 1\n')
    worker = proc.wait_for("worker_ready")["pid"]
    baseline = _pipe_fds(worker)
    held = []
    for _ in range(20):
        sock, (rep, _, _) = open_tunnel(proc.address, "127.0.0.1", echo_target.port)
        assert rep == 0
        data = os.urandom(1 << 20)
        sender = threading.Thread(target=sock.sendall, args=(data,))
        sender.start()
        assert hashlib.sha256(recv_exact(sock, len(data))).digest() == hashlib.sha256(data).digest()
        sender.join()
        held.append(sock)
    assert _pipe_fds(worker) - baseline <= 4, "pipes must go back to the pool when empty"
    for sock in held:
        sock.close()


@pytest.mark.parametrize("splice", ["true", "false"])
def test_16_mib_each_way_with_and_without_splice(spawn, splice):
    proc = spawn(f'listen = ["127.0.0.1:0"]\nworkers = 1\n[relay]\nsplice = {splice}\n')
    size = 16 << 20
    got: dict[str, str] = {}
    done = threading.Event()

    def sink_and_source(sock: socket.socket, peer: object) -> None:
        sender = threading.Thread(
            target=lambda: (sock.sendall(b"\x5a" * size), sock.shutdown(socket.SHUT_WR))
        )
        sender.start()
        got["up"] = hashlib.sha256(recv_all(sock)).hexdigest()
        sender.join()
        done.set()

    target = TargetServer(sink_and_source)
    try:
        sock, (rep, _, _) = open_tunnel(proc.address, "127.0.0.1", target.port)
        assert rep == 0
        up = os.urandom(size)
        sender = threading.Thread(target=lambda: (sock.sendall(up), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        down = recv_all(sock)
        sender.join()
        sock.close()
        assert down == b"\x5a" * size
        proc.wait_for("tunnel_closed", lambda e: e["target"].endswith(f":{target.port}"))
        assert done.wait(TIMEOUT)
        assert got["up"] == hashlib.sha256(up).hexdigest()
    finally:
        target.close()


def _auth_proxy(spawn):
    from socksd.passwords import hash_password

    return spawn(
        'listen = ["127.0.0.1:0"]\nworkers = 1\n[auth]\nmethod = "password"\n'
        f'[auth.users]\nalice = "{hash_password("secret")}"\n'
    )


def test_early_payload_during_password_check_is_relayed(spawn, echo_target):
    """A client that sends its request and 1 MiB of payload before any reply (while
    scrypt runs) gets its tunnel and every byte."""
    proc = _auth_proxy(spawn)
    payload = os.urandom(1 << 20)
    s = socket.create_connection(proc.address, timeout=TIMEOUT)
    sender = threading.Thread(
        target=s.sendall,
        args=(
            b"\x05\x01\x02"
            + b"\x01\x05alice\x06secret"
            + encode_request("127.0.0.1", echo_target.port)
            + payload,
        ),
    )
    sender.start()
    assert recv_exact(s, 2) == b"\x05\x02"
    assert recv_exact(s, 2) == b"\x01\x00"
    assert read_reply(s)[0] == 0
    assert recv_exact(s, len(payload)) == payload
    sender.join()
    s.close()


def test_client_reset_during_password_check_is_not_a_crash(spawn, echo_target):
    proc = _auth_proxy(spawn)
    for _ in range(5):
        s = socket.create_connection(proc.address, timeout=TIMEOUT)
        s.sendall(b"\x05\x01\x02")
        assert recv_exact(s, 2) == b"\x05\x02"
        s.sendall(b"\x01\x05alice\x06secret")
        s.shutdown(socket.SHUT_WR)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # RST while scrypt runs: the verdict's write fails
    sock, (rep, _, _) = open_tunnel(
        proc.address, "127.0.0.1", echo_target.port, auth=(b"alice", b"secret")
    )
    assert rep == 0
    sock.close()
    proc.wait_count("handshake_failed", 5)
    assert [e for e in proc.events if e.get("level") == "error"] == []
