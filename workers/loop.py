"""The worker's event loop: a selector, a timer heap and a thread-safe wake-up.

Owns: readiness dispatch, timers on the monotonic clock, `call_soon_threadsafe`.
Must not: know sessions or SOCKS; it only calls `on_readable`/`on_writable`/`on_crash`
on the handler object registered with each file object.

One tick = select (until the next timer at most), dispatch ready handlers, run due
timers, run callbacks posted from threads (the resolver pool).

It drives `select.epoll` directly rather than `selectors`: one dict lookup per event
instead of a SelectorKey per registration and per event, measured at ~7 % of a
worker's CPU at 4,000 tunnels/s.
"""

from __future__ import annotations

import heapq
import os
import select
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from socksd.handlers import Handler, ReadOnlyHandler
from socksd.logs import get_logger

EVENT_READ = 1
EVENT_WRITE = 2
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_FAULT = select.EPOLLERR | select.EPOLLHUP
# events -> epoll mask, indexed by EVENT_READ | EVENT_WRITE
_EPOLL_MASK = (0, _IN, _OUT, _IN | _OUT)


class Timer:
    """A cancellable timer handle returned by `Loop.call_later`."""

    __slots__ = ("when", "callback", "args", "cancelled", "_loop")

    def __init__(
        self,
        when: float,
        callback: Callable[..., object],
        args: tuple[Any, ...],
        loop: Loop | None = None,
    ) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False
        self._loop = loop

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        # Drop references so a cancelled timer does not keep a session alive.
        self.callback = _noop
        self.args = ()
        if self._loop is not None:
            self._loop._cancelled += 1
            self._loop = None


def _noop(*_: object) -> None:
    return None


class _Wakeup(ReadOnlyHandler):
    """Read end of the eventfd that threads write to after posting a callback."""

    def __init__(self, loop: Loop) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._loop = loop

    def fileno(self) -> int:
        return self.fd

    def on_readable(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass  # another tick already drained it; the queue is run every tick anyway

    def on_crash(self, exc: BaseException) -> None:
        raise exc


class Loop:
    """A single-threaded epoll loop with timers."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._masks: dict[int, int] = {}
        # fds registered during the current dispatch batch: their events in this batch
        # belong to a socket that was closed and whose number was reused.
        self._fresh: set[int] = set()
        # Heap entries are (when, seq, timer) tuples: compared in C, not by a Python
        # __lt__ (that cost ~4 us per push at a few thousand pending idle timers).
        self._timers: list[tuple[float, int, Timer]] = []
        self._cancelled = 0  # cancelled timers still in the heap
        self._seq = 0
        self._posted: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._wakeup = _Wakeup(self)
        self.register(self._wakeup, EVENT_READ, self._wakeup)
        self._running = False
        self.tick_hooks: list[Callable[[], object]] = []  # run at the end of every tick
        # EPOLLERR/EPOLLHUP bits of the event being dispatched to on_writable().
        self.fault = 0
        self._log = get_logger()
        self.now = time.monotonic()

    # -- registration ---------------------------------------------------------------
    # Set-up calls take file objects; the per-tunnel ones (set_interest, hand_over,
    # forget) take the fd the caller keeps: no fileno() call per step.

    def register(self, fileobj: Any, events: int, handler: Handler) -> None:
        self.set_interest(fileobj.fileno(), 0, events, handler)

    def modify(self, fileobj: Any, events: int, handler: Handler) -> None:
        """Change the events and/or the handler of a registered file object."""
        fd = fileobj.fileno()
        mask = _EPOLL_MASK[events]
        if self._masks[fd] != mask:
            self._epoll.modify(fd, mask)
            self._masks[fd] = mask
        self._handlers[fd] = handler

    def unregister(self, fileobj: Any) -> None:
        """Stop watching `fileobj`; call it before closing the file object."""
        fd = fileobj.fileno()
        self._epoll.unregister(fd)
        self.forget(fd)

    def hand_over(self, fd: int, handler: Handler) -> None:
        """Route a registered fd's events to another handler (no syscall)."""
        self._handlers[fd] = handler

    def forget(self, fd: int) -> None:
        """Drop `fd` from the loop without epoll_ctl, because the caller closes it
        next: closing the last fd of a socket removes it from the epoll set anyway
        (our sockets are never dup'd). Saves a syscall per socket per tunnel."""
        del self._handlers[fd]
        del self._masks[fd]

    def handler_of(self, fileobj: Any) -> Handler | None:
        return self._handlers.get(fileobj.fileno())

    def set_interest(self, fd: int, current: int, want: int, handler: Handler) -> int:
        """Move `fd` from `current` to `want` events (0 = not registered).

        Returns `want`, for the caller to keep as its new `current`; no syscall when
        nothing changes, which is the common case on the relay's hot path.
        """
        if want == current:
            return want
        if want == 0:
            self._epoll.unregister(fd)
            del self._handlers[fd]
            del self._masks[fd]
            return 0
        mask = _EPOLL_MASK[want]
        if current == 0:
            self._epoll.register(fd, mask)
            self._fresh.add(fd)
        else:
            self._epoll.modify(fd, mask)
        self._handlers[fd] = handler
        self._masks[fd] = mask
        return want

    # -- timers and cross-thread posts ----------------------------------------------

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        """Run `callback(*args)` after `delay` seconds (monotonic clock)."""
        self._seq += 1
        when = time.monotonic() + delay
        timer = Timer(when, callback, args, self)
        heapq.heappush(self._timers, (when, self._seq, timer))
        if self._cancelled > 1024 and self._cancelled * 2 > len(self._timers):
            # Most tunnels cancel their handshake/connect/idle timers long before they
            # are due (idle: 300 s); without this the heap would grow with the rate.
            self._timers = [e for e in self._timers if not e[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0
        return timer

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any) -> None:
        """Post `callback(*args)` from any thread; it runs in the loop's next tick."""
        self._posted.append((callback, args))
        try:
            os.eventfd_write(self._wakeup.fd, 1)
        except OSError:
            pass  # the loop is closed (worker stopping): nobody is left to run it

    # -- running --------------------------------------------------------------------

    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        """Run ticks until `stop()`."""
        self._running = True
        while self._running:
            self.run_once()

    def run_once(self) -> None:
        timeout = self._next_timeout()
        ready = self._epoll.poll(-1 if timeout is None else timeout)
        self.now = time.monotonic()
        handlers, masks, fresh = self._handlers, self._masks, self._fresh
        fresh.clear()
        for fd, events in ready:
            # A handler earlier in this batch may have closed this fd (no handler now),
            # or closed it and registered a new socket under the same number (fresh).
            handler = handlers.get(fd)
            if handler is None or fd in fresh:
                continue
            try:
                if events == _IN:  # the usual event: readable, nothing else to check
                    if masks[fd] & _IN:
                        handler.on_readable()
                    continue
                self.fault = events & _FAULT  # for on_writable (a connect's outcome)
                if self.fault:
                    events |= masks[fd]  # errors and hang-ups surface through recv/send
                if events & _IN & masks[fd]:
                    handler.on_readable()
                if events & _OUT and handlers.get(fd) is handler and masks[fd] & _OUT:
                    handler.on_writable()
            except Exception as exc:  # noqa: BLE001 - dispatch boundary: contain and log
                self._crash(handler, exc)
        self._run_timers()
        self._run_posted()
        for hook in self.tick_hooks:
            hook()

    def _next_timeout(self) -> float | None:
        if self._posted:
            return 0.0
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
            self._cancelled -= 1
        if not timers:
            return None
        return max(0.0, timers[0][0] - time.monotonic())

    def _run_timers(self) -> None:
        timers = self._timers
        now = self.now
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            if timer.cancelled:
                self._cancelled -= 1
                continue
            callback, args = timer.callback, timer.args
            timer.cancelled = True  # ran: not counted as a cancelled heap entry
            timer.callback, timer.args, timer._loop = _noop, (), None
            try:
                callback(*args)
            except Exception as exc:  # noqa: BLE001 - dispatch boundary
                self._crash(getattr(callback, "__self__", None), exc)

    def _run_posted(self) -> None:
        posted = self._posted
        for _ in range(len(posted)):
            callback, args = posted.popleft()
            try:
                callback(*args)
            except Exception as exc:  # noqa: BLE001 - dispatch boundary
                self._crash(getattr(callback, "__self__", None), exc)

    def _crash(self, handler: object, exc: Exception) -> None:
        on_crash = getattr(handler, "on_crash", None)
        if on_crash is None:
            self._log.error("loop_callback_crashed", exc_info=exc)
            return
        on_crash(exc)

    def heap_size(self) -> int:
        """Timers in the heap, cancelled ones included (bounded by compaction)."""
        return len(self._timers)

    def close(self) -> None:
        self._epoll.close()
        os.close(self._wakeup.fd)
