"""Signals as bytes on a socketpair, for an event loop to read.

Owns: `signal.set_wakeup_fd` on a socketpair, do-nothing handlers, and turning the
signal numbers read back into calls of `on_signal` on the loop's own thread.
Must not: do any work in a signal handler (the loop does it, between events).

Used by the supervisor's selector loop and by each worker's epoll loop.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterable
from typing import Any

from socksd.handlers import ReadOnlyHandler


class SignalPipe(ReadOnlyHandler):
    """Readiness handler of the read end; `r` is what a loop watches."""

    def __init__(self, signals: Iterable[int], on_signal: Callable[[int], None]) -> None:
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.w.setblocking(False)
        self._signals = tuple(signals)
        self._on_signal = on_signal

    def install(self) -> None:
        signal.set_wakeup_fd(self.w.fileno(), warn_on_full_buffer=False)
        for signum in self._signals:
            signal.signal(signum, _ignore)

    def on_readable(self) -> None:
        try:
            data = self.r.recv(256)
        except BlockingIOError:
            return
        for signum in data:
            self._on_signal(signum)

    def on_crash(self, exc: BaseException) -> None:
        raise exc

    def close(self) -> None:
        """Stop the wake-ups and close both ends (unregister `r` from the loop first)."""
        signal.set_wakeup_fd(-1)
        self.r.close()
        self.w.close()


def _ignore(signum: int, frame: Any) -> None:
    return None  # the wakeup fd carries the signal to the loop
