"""Frames between the supervisor and one worker, over a private socketpair.

Owns: the frame format (a 6-byte header: payload length, kind, number of file
descriptors; then the payload), non-blocking reads and writes of whole frames, and
passing file descriptors with a frame (SCM_RIGHTS, `socket.send_fds`).
Must not: know what a frame means, or register itself anywhere: each side's loop asks
`wants_write()` and calls `read()` / `write()` when the socket is ready.

Payloads are pickled. Both ends are the same program and the socketpair is created
by the supervisor before it forks the worker, so nothing else can write to it; the
supervisor sends the worker a validated `Config` (frozen dataclasses, password hashes,
parsed rules) and a worker's answer is a small dict. A frame's descriptors travel with
its first bytes; the reader keeps every descriptor it receives in arrival order and
gives a frame the first `nfds` of them once the frame is whole.
"""

from __future__ import annotations

import array
import os
import pickle
import select
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

# Frame kinds.
CONFIG = 1  # supervisor -> worker: {"reload", "config", "listen"}; fds: new listeners
APPLIED = 2  # worker -> supervisor: {"reload", "revoked", ...}, the reload's figures
USAGE = 3  # worker -> supervisor: the accounts changed since its last one (socksd.usage)
QUERY = 4  # supervisor -> worker: {"id", "op": "tunnels" | "kick", "user", "ingress", "conn"}
ANSWER = 5  # worker -> supervisor: {"id", "tunnels": [...]} (both ops; kick: those closed)

_HEADER = struct.Struct("!IBB")  # payload length, kind, descriptors sent with it
MAX_FRAME = 1 << 30  # 100,000 users with rules pickle to ~15 MiB; this is a sanity cap
_MAX_FDS = 64  # per frame: one listening socket per new listen address
_READ = 1 << 20


class ChannelError(Exception):
    """The peer sent something that is not a frame: the channel is unusable."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: int
    body: Any
    fds: tuple[int, ...] = ()


class Channel:
    """One end of a supervisor <-> worker socketpair (non-blocking)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._inbuf = bytearray()
        self._fds: deque[int] = deque()
        self._out: deque[tuple[memoryview, tuple[int, ...]]] = deque()
        self.eof = False  # the peer closed its end
        self.closed = False  # ours is closed

    @classmethod
    def pair(cls) -> tuple[socket.socket, socket.socket]:
        """A new socketpair: one end for each process (wrap each in a Channel after fork)."""
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- sending ------------------------------------------------------------------------

    def send(self, kind: int, body: Any, fds: tuple[int, ...] = ()) -> None:
        """Queue a frame; `write()` sends it as the socket takes it. The caller keeps
        `fds` open until the frame is sent (the kernel duplicates them on send)."""
        if len(fds) > _MAX_FDS:
            raise ValueError(f"at most {_MAX_FDS} descriptors per frame")
        payload = pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)
        if len(payload) > MAX_FRAME:
            raise ValueError(f"frame of {len(payload)} bytes is over {MAX_FRAME}")
        data = _HEADER.pack(len(payload), kind, len(fds)) + payload
        self._out.append((memoryview(data), fds))

    def wants_write(self) -> bool:
        return bool(self._out)

    def write(self) -> None:
        """Send what the socket takes now.

        Raises:
            OSError: the peer is gone (EPIPE, ECONNRESET).
        """
        while self._out:
            view, fds = self._out[0]
            try:
                if fds:
                    sent = socket.send_fds(self.sock, [view], list(fds))
                else:
                    sent = self.sock.send(view)
            except BlockingIOError:
                return
            if sent < len(view):
                self._out[0] = (view[sent:], ())  # descriptors went with the first bytes
                return
            self._out.popleft()

    def flush_blocking(self, timeout: float) -> bool:
        """Send what is queued, waiting up to `timeout` seconds in all for the peer to
        take it (a worker's last frames at exit, when no loop runs any more).

        Returns:
            True when everything was sent; False: the peer is gone or too slow.
        """
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT)
        while self._out:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return False
            try:
                self.write()  # non-blocking: as much as the socket takes now
            except OSError:
                return False  # the supervisor is gone
        return True

    # -- receiving ----------------------------------------------------------------------

    def read(self) -> list[Frame] | None:
        """The frames completed by what can be read now; None at EOF.

        Raises:
            ChannelError: a malformed frame (the channel must be closed).
        """
        fd_space = socket.CMSG_SPACE(_MAX_FDS * 4)
        while True:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(_READ, fd_space)
            except BlockingIOError:
                break
            except ConnectionResetError:
                data, ancdata, flags = b"", [], 0
            for level, type_, cdata in ancdata:
                if level == socket.SOL_SOCKET and type_ == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                    self._fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                # Out of fds: the kernel dropped descriptors a frame carries.
                raise ChannelError("descriptors lost in transit (MSG_CTRUNC: out of fds?)")
            if not data:
                self.eof = True
                # The frames completed before the EOF (a worker's last usage report).
                return self._frames() or None
            self._inbuf += data
            if len(data) < _READ:
                break
        return self._frames()

    def _frames(self) -> list[Frame]:
        frames = []
        buf = self._inbuf
        while len(buf) >= _HEADER.size:
            length, kind, nfds = _HEADER.unpack_from(buf)
            if length > MAX_FRAME:
                raise ChannelError(f"frame length {length} is over {MAX_FRAME}")
            end = _HEADER.size + length
            if len(buf) < end:
                break
            if len(self._fds) < nfds:
                raise ChannelError(f"frame announces {nfds} descriptors, {len(self._fds)} came")
            fds = tuple(self._fds.popleft() for _ in range(nfds))
            try:
                body = pickle.loads(buf[_HEADER.size : end])  # noqa: S301 - our own parent
            except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad frame
                for fd in fds:
                    os.close(fd)
                raise ChannelError(f"undecodable frame: {exc}") from None
            del buf[:end]
            frames.append(Frame(kind, body, fds))
        return frames

    def close(self) -> None:
        """Close the socket and every received descriptor no frame took."""
        if self.closed:
            return
        while self._fds:
            os.close(self._fds.popleft())
        self._out.clear()
        self.sock.close()
        self.closed = True
