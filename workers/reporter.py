"""What a worker tells the supervisor: counters, gauges and egress figures, on a timer.

Owns: the timed flush of stats lines to the supervisor's pipe, hello/bye, and noticing
that the supervisor is gone. The counters it sends are `workers.counters`'.
Must not: block. The pipe is non-blocking; a full pipe drops the line and counts it.

Counters are totals since the worker started (not deltas), so a dropped line loses
nothing: the next one carries the totals. Each line is one orjson object under
PIPE_BUF bytes, so the kernel writes it whole or not at all; egress figures are split
over as many `egress` lines as they need.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

from socksd.stats import PIPE_LINE_MAX, encode_egress_lines
from workers.counters import WorkerCounters
from workers.loop import Loop, Timer
from workers.pressure import PortPressure


class Reporter:
    """Writes this worker's stats lines to the supervisor every `interval` seconds."""

    def __init__(
        self,
        loop: Loop,
        fd: int | None,
        counters: WorkerCounters,
        pressure: PortPressure,
        open_conns: set[Any],
        slot: int,
        generation: int,
        interval: float,
        on_orphaned: Any,
        supervisor_pid: int | None = None,
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._counters = counters
        self._pressure = pressure
        self._open = open_conns
        self._slot = slot
        self._gen = generation
        self._interval = interval
        self._seq = 0
        # The supervisor's pid is passed in: reading getppid() here would miss a
        # supervisor that died between the fork and this line.
        self._parent = supervisor_pid or os.getppid()
        self._on_orphaned = on_orphaned
        self._timer: Timer | None = None
        if fd is not None:
            os.set_blocking(fd, False)

    def start(self) -> None:
        self._send({"kind": "hello"})
        self._timer = self._loop.call_later(self._interval, self._tick)

    def _tick(self) -> None:
        if os.getppid() != self._parent:
            self._on_orphaned()  # the supervisor died: nobody will ever stop us
            return
        if self._fd is None and self._parent:
            return  # orphaned already: draining
        self.flush()
        self._timer = self._loop.call_later(self._interval, self._tick)

    def flush(self) -> None:
        """Send the current figures now (also called at exit)."""
        c = self._counters
        egress = self._pressure.snapshot(self._loop.now)
        egress_errors: dict[str, int] = {}
        retries = rescued = exhausted = 0
        for ip in egress.ips:
            retries += ip.retries
            rescued += ip.rescued
            exhausted += ip.exhausted
            for name, n in ip.failed.items():
                egress_errors[name] = egress_errors.get(name, 0) + n
        self._seq += 1
        self._send(
            {
                "kind": "stats",
                "counters": {
                    "accepted": c.accepted,
                    "tunnels_opened": c.tunnels_opened,
                    "tunnels_closed": c.tunnels_closed,
                    "bytes_up": c.bytes_up,
                    "bytes_down": c.bytes_down,
                    "handshake_failures": c.handshake_failures,
                    "refused": c.refused,
                    "udp_datagrams_up": c.udp_datagrams_up,
                    "udp_datagrams_down": c.udp_datagrams_down,
                    "udp_bytes_up": c.udp_bytes_up,
                    "udp_bytes_down": c.udp_bytes_down,
                    "udp_dropped": c.udp_dropped,
                    "replies": {str(k): v for k, v in c.replies.items()},
                    "egress_errors": egress_errors,
                    "retries": retries,
                    "rescued": rescued,
                    "exhausted": exhausted,
                    "dropped_lines": c.dropped_lines,
                },
                "gauges": {
                    "open_tunnels": c.open_tunnels,
                    "open_sessions": len(self._open) - c.open_tunnels,
                },
            }
        )
        for line in encode_egress_lines(egress, self._header()):
            self._write(line)

    def bye(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        self._send({"kind": "bye"})

    def _header(self) -> dict[str, Any]:
        return {
            "v": 1,
            "worker": self._slot,
            "gen": self._gen,
            "pid": os.getpid(),
            "seq": self._seq,
            "ts": round(time.time(), 3),
        }

    def _send(self, body: dict[str, Any]) -> None:
        line = orjson.dumps({**self._header(), **body}) + b"\n"
        if len(line) > PIPE_LINE_MAX:
            # Only handshake-failure reasons and errno names are open-ended, and both
            # come from fixed sets; drop the detail rather than break atomicity.
            body = {**body, "truncated": True}
            body.get("counters", {}).pop("handshake_failures", None)
            line = orjson.dumps({**self._header(), **body}) + b"\n"
        self._write(line)

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
