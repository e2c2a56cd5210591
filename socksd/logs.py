"""structlog set-up: one JSON object per line on stdout, rendered by orjson.

Owns: processor chain, level filtering, the process-wide context (role, worker, pid),
and the line buffer a worker flushes once per loop tick.
Must not: format data into event names; every fact goes into a key.

Cost matters: a worker writes a `tunnel_closed` line per tunnel. The chain is one
processor that stamps and orders the fields plus orjson, and a worker's lines go to a
buffer written with one `write()` per loop tick instead of one per line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _dumps(event: Any, **_: Any) -> bytes:
    # OPT_NON_STR_KEYS: counters keyed by errno/reply codes stay readable.
    return orjson.dumps(event, option=orjson.OPT_NON_STR_KEYS, default=str)


_PROCESS: dict[str, Any] = {}  # role, worker, gen, pid: bound once per process
_LEVEL_NAMES = {"warn": "warning", "exception": "error", "critical": "critical"}


def _stamp(logger: Any, name: str, event: MutableMapping[str, Any]) -> dict[str, Any]:
    # Operators scan lines by time, level and event name: put those first.
    return {
        "timestamp": datetime.now(UTC).isoformat(timespec="microseconds"),
        "level": _LEVEL_NAMES.get(name, name),
        "event": event.pop("event", None),
        **event,
        **_PROCESS,
    }


class LineWriter:
    """structlog's logger: rendered lines to fd 1, optionally buffered until `flush()`."""

    def __init__(self, fd: int = 1) -> None:
        self._fd = fd
        self._buf = bytearray()
        self.buffered = False

    def msg(self, message: bytes) -> None:
        self._buf += message
        self._buf += b"\n"
        if not self.buffered or len(self._buf) >= 65536:
            self.flush()

    debug = info = warning = warn = error = exception = critical = log = msg

    def flush(self) -> None:
        buf = self._buf
        while buf:
            n = os.write(self._fd, buf)
            del buf[:n]


_WRITER = LineWriter()


def configure(level: str = "info") -> None:
    """Configure structlog for this process (call again to change the level)."""
    structlog.configure(
        processors=[
            structlog.processors.format_exc_info,
            _stamp,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *args: _WRITER,
        cache_logger_on_first_use=True,
    )


def set_buffered(buffered: bool) -> None:
    """Buffer lines until `flush()` (a worker flushes once per loop tick)."""
    _WRITER.buffered = buffered
    if not buffered:
        _WRITER.flush()


def flush() -> None:
    _WRITER.flush()


def bind_process(**context: Any) -> None:
    """Context that every event of this process carries (role, worker, pid)."""
    _WRITER.flush()
    _PROCESS.clear()
    _PROCESS.update(context)


def get_logger(**initial: Any) -> Any:
    """Return a logger with `initial` bound once (e.g. conn_id, client)."""
    return structlog.get_logger().bind(**initial)
