"""The Python floor: the least Python one SOCKS5 CONNECT tunnel can cost.

    python bench/floor.py HOST PORT [USER PASSWORD]

A baseline for bench/perf.py (`--floor`), not a proxy anyone should run: one process,
one epoll loop, SOCKS5 CONNECT to an IPv4 address only, with no auth or (given USER and
PASSWORD) RFC 1929 user/password checked by comparing bytes, the same syscalls as
socksd's path (IP_BIND_ADDRESS_NO_PORT egress from the listen IP, TCP_NODELAY,
getsockname for BND, half-close, one orjson line per tunnel written once per loop
tick) and nothing else: no codec, no validation beyond the version bytes, no
timeouts, no access rules, no accounting, no back-pressure (a full socket buffer would
drop bytes), no error handling to speak of. The gap between it and socksd is the cost
of socksd's structure, not of Python.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time

import orjson

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT


class Tunnel:
    __slots__ = ("c", "u", "cfd", "ufd", "state", "up", "down", "t0", "ceof", "ueof", "peer")

    def __init__(self, c: socket.socket, peer: tuple[str, int]) -> None:
        self.c, self.cfd, self.peer = c, c.fileno(), peer
        self.u: socket.socket | None = None
        self.ufd = -1
        self.state = 0  # 0 greeting, 1 request, 2 connecting, 3 relaying, 4 user/password
        self.up = self.down = 0
        self.t0 = time.monotonic()
        self.ceof = self.ueof = False
        tunnels[self.cfd] = self
        ep.register(self.cfd, EPOLLIN)

    def event(self, fd: int) -> None:
        if self.state == 3:
            if fd == self.cfd:
                self.pump(self.c, self.u, True)
            else:
                self.pump(self.u, self.c, False)
        elif self.state == 2:
            self.connected()
        else:
            self.handshake()

    def handshake(self) -> None:
        data = self.c.recv(4096)
        if self.state == 0:
            if data[:1] != b"\x05":
                self.close()
                return
            if LOGIN is None:
                self.c.send(b"\x05\x00")
                self.state = 1
            elif b"\x02" in data[2:]:
                self.c.send(b"\x05\x02")
                self.state = 4
            else:
                self.c.send(b"\x05\xff")
                self.close()
            return
        if self.state == 4:
            self.c.send(b"\x01\x00" if data == LOGIN else b"\x01\x01")
            if data == LOGIN:
                self.state = 1
            else:
                self.close()
            return
        if data[:4] != b"\x05\x01\x00\x01" or len(data) < 10:
            self.close()
            return
        u = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        u.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
        u.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        u.bind((HOST, 0))
        target = "%d.%d.%d.%d" % (data[4], data[5], data[6], data[7])  # noqa: UP031
        u.connect_ex((target, (data[8] << 8) | data[9]))
        self.u, self.ufd, self.state = u, u.fileno(), 2
        tunnels[self.ufd] = self
        ep.register(self.ufd, EPOLLOUT)

    def connected(self) -> None:
        assert self.u is not None
        if self.u.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.c.send(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00")
            self.close()
            return
        host, port = self.u.getsockname()
        self.c.send(b"\x05\x00\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big"))
        ep.modify(self.ufd, EPOLLIN)
        self.state = 3

    def pump(self, src: socket.socket | None, dst: socket.socket | None, up: bool) -> None:
        assert src is not None and dst is not None
        n = src.recv_into(buf)
        if n == 0:
            if up:
                self.ceof = True
                ep.unregister(self.cfd)
            else:
                self.ueof = True
                ep.unregister(self.ufd)
            if self.ceof and self.ueof:
                self.close()
            else:
                dst.shutdown(socket.SHUT_WR)
            return
        dst.send(view[:n])
        if up:
            self.up += n
        else:
            self.down += n

    def close(self) -> None:
        tunnels.pop(self.cfd, None)
        tunnels.pop(self.ufd, None)
        self.c.close()
        if self.u is not None:
            self.u.close()
        line = {
            "event": "tunnel_closed",
            "client": "%s:%d" % self.peer,  # noqa: UP031
            "bytes_up": self.up,
            "bytes_down": self.down,
            "duration_ms": round((time.monotonic() - self.t0) * 1000, 1),
        }
        out.extend(orjson.dumps(line) + b"\n")


HOST, PORT = sys.argv[1], int(sys.argv[2])
# The one RFC 1929 sub-negotiation accepted, whole (VER ULEN USER PLEN PASSWORD).
LOGIN = None
if len(sys.argv) == 5:
    user, password = sys.argv[3].encode(), sys.argv[4].encode()
    LOGIN = b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password
ep = select.epoll()
tunnels: dict[int, Tunnel] = {}
buf = bytearray(65536)
view = memoryview(buf)
out = bytearray()


def main() -> None:
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lst.bind((HOST, PORT))
    lst.listen(4096)
    lst.setblocking(False)
    lfd = lst.fileno()
    ep.register(lfd, EPOLLIN)
    while True:  # stopped by the bench's signal
        for fd, _ in ep.poll():
            if fd == lfd:
                for _ in range(64):
                    try:
                        cfd, peer = lst._accept()  # type: ignore[attr-defined]
                    except BlockingIOError:
                        break
                    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, cfd)
                    c.setblocking(False)
                    Tunnel(c, peer)
            elif (t := tunnels.get(fd)) is not None:
                t.event(fd)
        if out:
            os.write(1, out)
            out.clear()


if __name__ == "__main__":
    main()
