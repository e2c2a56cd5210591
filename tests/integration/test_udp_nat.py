"""UDP ASSOCIATE behind 1:1 NAT (issue 17): the advertised address, the relay's port
range, and the caps on open associations; a real socksd, real UDP clients."""

from __future__ import annotations

import socket
from typing import Any

from socksd.passwords import hash_password
from tests.integration.helpers import TIMEOUT, encode_request, read_reply, recv_exact
from tests.integration.test_protocols import UdpEcho, parse_udp_header, udp_client, udp_header

_PASSWORDS = {name: f"{name}-pw" for name in ("alice", "bob", "carol")}


def _users() -> str:
    lines = [f'{name} = "{hash_password(pw)}"' for name, pw in _PASSWORDS.items()]
    return '[auth]\nmethod = "password"\n[auth.users]\n' + "\n".join(lines) + "\n"


def _associate(
    proxy: tuple[str, int], client: socket.socket, user: str | None = None
) -> tuple[socket.socket, tuple[int, str, int]]:
    """The TCP control connection and the ASSOCIATE reply (REP, BND.ADDR, BND.PORT)."""
    ctl = socket.create_connection(proxy, timeout=TIMEOUT)
    if user is None:
        ctl.sendall(b"\x05\x01\x00")
        assert recv_exact(ctl, 2) == b"\x05\x00"
    else:
        ctl.sendall(b"\x05\x01\x02")
        assert recv_exact(ctl, 2) == b"\x05\x02"
        name, pw = user.encode(), _PASSWORDS[user].encode()
        ctl.sendall(b"\x01" + bytes([len(name)]) + name + bytes([len(pw)]) + pw)
        assert recv_exact(ctl, 2) == b"\x01\x00"
    ctl.sendall(encode_request(*client.getsockname()[:2], cmd=3))
    return ctl, read_reply(ctl)


def _echo_through(client: socket.socket, relay: tuple[str, int], target: Any) -> None:
    client.sendto(udp_header(*target.address) + b"ping", relay)
    _, _, body = parse_udp_header(client.recvfrom(65535)[0])
    assert body == b"echo:ping"


def test_the_reply_names_the_advertised_address_of_its_ingress_ip(spawn):
    target = UdpEcho("127.0.0.1")
    proxy = spawn(
        'listen = ["127.0.0.2:0", "127.0.0.1:0"]\nworkers = 1\n'
        '[[udp.advertise]]\ningress = "127.0.0.2"\naddress = "203.0.113.5"\n'
    )
    natted, plain = proxy.listen
    try:
        client = udp_client("127.0.0.1")
        ctl, (rep, host, port) = _associate(natted, client)
        assert (rep, host) == (0, "203.0.113.5"), "BND.ADDR: the public address"
        # The relay itself is bound on the ingress IP (the NAT forwards the public one).
        _echo_through(client, ("127.0.0.2", port), target)
        ctl.close()
        line = proxy.wait_for("tunnel_closed", lambda e: e.get("command") == "udp_associate")
        assert line["udp_relay"] == f"127.0.0.2:{port}"
        assert line["udp_advertised"] == f"203.0.113.5:{port}"
        # Another ingress IP has no advertised address: its own.
        ctl, (rep, host, port) = _associate(plain, client)
        assert (rep, host) == (0, "127.0.0.1")
        _echo_through(client, (host, port), target)
        ctl.close()
        client.close()
    finally:
        target.close()


def test_the_relay_port_comes_from_the_range_until_it_is_full(spawn):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a free-ish range
        probe.bind(("127.0.0.1", 0))
        low = min(probe.getsockname()[1], 65000)
    proxy = spawn(
        f'listen = ["127.0.0.1:0"]\nworkers = 1\n[udp]\nport_range = [{low}, {low + 2}]\n'
    )
    client = udp_client("127.0.0.1")
    held = []
    for _ in range(3):
        ctl, (rep, _host, port) = _associate(proxy.address, client)
        assert rep == 0 and low <= port <= low + 2
        held.append((ctl, port))
    assert len({port for _, port in held}) == 3
    ctl, (rep, _, _) = _associate(proxy.address, client)
    assert rep == 1, "general failure: no free port in the range"
    line = proxy.wait_for("tunnel_closed", lambda e: e.get("reply") == 1)
    assert line["reason"] == "udp_port_range_full"
    ctl.close()
    held.pop()[0].close()  # one port free again
    proxy.wait_for("tunnel_closed", lambda e: e.get("reason") == "eof")
    ctl, (rep, _, port) = _associate(proxy.address, client)
    assert rep == 0 and low <= port <= low + 2
    for sock in [ctl, *(c for c, _ in held)]:
        sock.close()
    client.close()


def test_the_caps_on_open_associations_refuse_with_0x02(spawn):
    target = UdpEcho("127.0.0.1")
    proxy = spawn(
        'listen = ["127.0.0.1:0"]\nworkers = 1\n'
        + _users()
        + "[limits]\nmax_udp = 2\nmax_udp_per_user = 1\n"
    )
    client = udp_client("127.0.0.1")
    try:
        alice, (rep, host, port) = _associate(proxy.address, client, "alice")
        assert rep == 0
        _echo_through(client, (host, port), target)
        again, (rep, _, _) = _associate(proxy.address, client, "alice")
        assert rep == 2, "alice holds max_udp_per_user"
        again.close()
        bob, (rep, _, _) = _associate(proxy.address, client, "bob")
        assert rep == 0
        carol, (rep, _, _) = _associate(proxy.address, client, "carol")
        assert rep == 2, "max_udp: 2 open in all"
        carol.close()
        refused = proxy.wait_count("tunnel_closed", 2, lambda e: e.get("reply") == 2)
        reasons = [e["reason"] for e in refused]
        assert reasons == ["user_udp_limit", "udp_limit"]
        alice.close()  # a place is free again
        proxy.wait_for("tunnel_closed", lambda e: e.get("user") == "alice" and e["reply"] == 0)
        carol, (rep, host, port) = _associate(proxy.address, client, "carol")
        assert rep == 0
        _echo_through(client, (host, port), target)
        carol.close()
        bob.close()
    finally:
        client.close()
        target.close()
