"""What a worker tells the supervisor, on a timer: its counters and egress figures,
and its per-customer usage.

Owns: when lines are sent (hello at start, a flush every `interval`, bye at exit), the
writes to the supervisor's pipe, when usage reports go (with each flush, over the
channel), and noticing that the supervisor is gone.
Must not: block, or decide what a line holds: socksd.stats encodes every line. The pipe
is non-blocking; a full pipe drops the line and counts it.

Counters are totals since the worker started (not deltas), so a dropped line loses
nothing: the next one carries the totals.

Usage goes over the channel, not the pipe: a report may name thousands of users, more
than one atomic pipe line (PIPE_BUF) holds, and the channel frames any size. A report
is skipped while the previous one is still queued (a slow supervisor costs the worker
no memory); its figures are cumulative too, so the next report makes up for it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from typing import Any, Protocol

from socksd.stats import LineHeader, encode_line, encode_report
from socksd.usage import Report
from workers.accounting import Ledger
from workers.counters import WorkerCounters
from workers.loop import Loop, Timer
from workers.pressure import PortPressure


class UsageSink(Protocol):
    """Where usage reports go (`workers.reload.WorkerChannel`)."""

    @property
    def idle(self) -> bool: ...

    def send_usage(self, report: Report) -> None: ...


class Reporter:
    """Writes this worker's stats lines to the supervisor every `interval` seconds."""

    def __init__(
        self,
        *,
        loop: Loop,
        fd: int | None,
        counters: WorkerCounters,
        pressure: PortPressure,
        open_conns: Collection[Any],
        slot: int,
        generation: int,
        interval: float,
        on_orphaned: Callable[[], None],
        supervisor_pid: int | None,
        ledger: Ledger | None = None,
    ) -> None:
        """Set up the reporter; nothing is sent before `start()`.

        Args:
            loop: the worker's loop, for the timer.
            fd: the write end of the stats pipe (made non-blocking here); None: no
                supervisor reads, only orphan detection runs.
            counters: the worker's totals.
            pressure: its egress counters.
            open_conns: its open connections (only their number is read).
            slot: the worker's slot, for the lines' header.
            generation: its generation, for the lines' header.
            interval: seconds between flushes.
            on_orphaned: called once the supervisor is found gone.
            supervisor_pid: the supervisor's pid as the fork saw it; None falls back to
                getppid() now, which misses a supervisor that died before this call.
            ledger: the worker's usage books (None: accounting off); reports go to
                `usage_sink` once the worker sets it.
        """
        self._loop = loop
        self._fd = fd
        self._counters = counters
        self._pressure = pressure
        self._open = open_conns
        self._slot = slot
        self._gen = generation
        self.interval = interval
        self._seq = 0
        # Required (no default) so that no caller forgets it: reading getppid() here
        # would miss a supervisor that died between the fork and this line.
        self._parent = supervisor_pid or os.getppid()
        self._on_orphaned = on_orphaned
        self._timer: Timer | None = None
        self._ledger = ledger
        self.usage_sink: UsageSink | None = None
        if fd is not None:
            os.set_blocking(fd, False)

    def start(self) -> None:
        """Say hello, then flush every `interval` seconds."""
        self._send({"kind": "hello"})
        self._timer = self._loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        if os.getppid() != self._parent:
            self._on_orphaned()  # the supervisor died: nobody will ever stop us
            return
        if self._fd is None and self._parent:
            return  # orphaned already: draining
        self.flush()
        self._timer = self._loop.call_later(self.interval, self._tick)

    def flush(self, final: bool = False) -> None:
        """Send the current figures now (`final`: at exit, the usage report even if the
        previous one is still queued)."""
        self._seq += 1
        egress = self._pressure.snapshot(self._loop.now)
        for line in encode_report(self._header(), self._counters, egress, len(self._open)):
            self._write(line)
        ledger, sink = self._ledger, self.usage_sink
        if ledger is not None and sink is not None and (final or sink.idle):
            report = ledger.report(self._open)
            if report["users"] or report["ingress"]:
                sink.send_usage(report)

    def bye(self) -> None:
        """Stop the timer, flush the final figures, and say goodbye."""
        if self._timer is not None:
            self._timer.cancel()
        self.flush(final=True)
        self._send({"kind": "bye"})

    def _header(self) -> LineHeader:
        return LineHeader(
            worker=self._slot,
            gen=self._gen,
            pid=os.getpid(),
            seq=self._seq,
            ts=round(time.time(), 3),
        )

    def _send(self, body: dict[str, Any]) -> None:
        self._write(encode_line(self._header(), body))

    def _write(self, line: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, line)
        except BlockingIOError:
            self._counters.dropped_lines += 1
        except BrokenPipeError:
            self._fd = None
            self._on_orphaned()  # nobody reads our stats: the supervisor is gone
