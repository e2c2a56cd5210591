"""A per-worker pool of pipes for zero-copy relaying with splice(2).

Owns: creating, lending and taking back non-blocking pipes.
Must not: hold a pipe that still has bytes in it (they would leak into the next
tunnel): callers give a pipe back only when it is empty, and close it otherwise.

A tunnel borrows a pipe only while bytes are moving through it and gives it back as
soon as the pipe is drained, so idle tunnels hold no pipe and cost two fds, not four.
"""

from __future__ import annotations

import fcntl
import os

# Bytes one splice can move. 256 KiB measured best for one 1 GiB stream (64 KiB: more
# syscalls; 1 MiB: no faster, and the per-user pipe budget, pipe-user-pages-soft =
# 64 MiB, would hold only 64 such pipes).
PIPE_SIZE = 1 << 18
_MIN_USEFUL = 1 << 16  # below this (budget exhausted: the kernel hands out 8 KiB) use recv/send
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
Pipe = tuple[int, int]  # (read fd, write fd)


class PipePool:
    """Lends empty non-blocking pipes; keeps at most `keep` idle ones."""

    def __init__(self, keep: int = 8) -> None:
        self._idle: list[Pipe] = []
        self._keep = keep

    def borrow(self) -> Pipe | None:
        """An empty pipe, or None when none worth having can be made (out of fds, or
        over the user's pipe budget): the caller then copies through user space."""
        if self._idle:
            return self._idle.pop()
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # over the budget for this size: keep what the kernel gave, if enough
        if fcntl.fcntl(w, _F_GETPIPE_SZ) < _MIN_USEFUL:
            close((r, w))
            return None
        return r, w

    def give_back(self, pipe: Pipe) -> None:
        """Return an EMPTY pipe."""
        if len(self._idle) < self._keep:
            self._idle.append(pipe)
        else:
            close(pipe)

    def close(self) -> None:
        for pipe in self._idle:
            close(pipe)
        self._idle.clear()


def close(pipe: Pipe) -> None:
    os.close(pipe[0])
    os.close(pipe[1])
