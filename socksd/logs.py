"""structlog set-up: one JSON object per line on stdout, rendered by orjson.

Owns: processor chain, level filtering, the process-wide context (role, worker, pid),
and the line buffer a worker flushes once per loop tick.
Must not: format data into event names; every fact goes into a key.

Cost matters: a worker writes a `tunnel_closed` line per tunnel. The chain is one
processor that stamps, orders and renders the fields with orjson, and a worker's lines
go to a buffer written with one `write()` per loop tick instead of one per line. The
bound loggers are structlog's filtering loggers with their enabled level methods
written out (`_direct_logger`): one dict, one orjson call, one append per line.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

import orjson
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


_PIPE_BUF = 4096
_BUFFER_LIMIT = 65536  # a buffered writer flushes early past this many bytes
_PROCESS: dict[str, Any] = {}  # role, worker, gen, pid: bound once per process
_LEVEL_NAMES = {"warn": "warning", "exception": "error", "critical": "critical"}
_format_exc_info = structlog.processors.format_exc_info
_second = -1  # the UTC second `_prefix` was rendered for
_prefix = ""


def _timestamp() -> str:
    """ISO 8601 UTC with microseconds; the date and time part is rendered once a second.

    Buffered (a worker): the lines of one loop tick share the stamp of the first, as
    they share the write() at its end; rendering it cost as much as the rest of a line.
    """
    writer = _WRITER
    if not writer.buffered:
        return _stamp()
    if not writer.stamp:
        writer.stamp = _stamp()
    return writer.stamp


def _stamp() -> str:
    global _second, _prefix  # noqa: PLW0603 - a one-entry cache, private to this module
    now = time.time()
    second = int(now)
    if second != _second:
        _second, _prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_prefix}.{int((now - second) * 1_000_000):06d}Z"


def _render(logger: Any, name: str, event: MutableMapping[str, Any]) -> bytes:
    """The whole chain in one processor: stamp, order, render with orjson."""
    if "exc_info" in event:
        event = _format_exc_info(logger, name, event)
    # Operators scan lines by time, level and event name: put those first.
    line = {
        "timestamp": _timestamp(),
        "level": _LEVEL_NAMES.get(name, name),
        "event": event.pop("event", None),
        **event,
        **_PROCESS,
    }
    # OPT_NON_STR_KEYS: counters keyed by errno/reply codes stay readable.
    return orjson.dumps(line, option=orjson.OPT_NON_STR_KEYS, default=str)


_CHAIN = [_render]
_OPTIONS = orjson.OPT_NON_STR_KEYS


def _direct_logger(min_level: int) -> type[Any]:
    """structlog's filtering logger for `min_level`, with each enabled level method
    running `_render` itself.

    structlog's own path for one line (method -> _proxy_to_logger -> _process_event ->
    processor -> logger method) cost ~45,000 instructions (callgrind), a tenth of a
    short tunnel's whole Python cost; built here, with the tick's shared stamp and a
    plain render first, ~17,000.
    Loggers whose processors are not `_CHAIN` (structlog reconfigured by someone
    else), lines with exc_info or %-args, exception() and log() take structlog's path.
    """
    base: type[Any] = structlog.make_filtering_bound_logger(min_level)

    def direct(level: int, name: str) -> Any:
        label = _LEVEL_NAMES.get(name, name)
        slow = getattr(base, name)

        def emit(self: Any, event: str, *args: Any, **kw: Any) -> None:
            if args or self._processors is not _CHAIN or "exc_info" in kw:
                slow(self, event, *args, **kw)
                return
            # The same line `_render` makes, without structlog's intermediate dict.
            writer = _WRITER
            line = {
                "timestamp": writer.stamp or _timestamp(),
                "level": label,
                "event": event,
                **self._context,
                **kw,
                **_PROCESS,
            }
            try:
                # Plain first: the chain's options cost ~3,400 instructions a line
                # (callgrind) and only matter for int keys or exotic values.
                rendered = orjson.dumps(line)
            except TypeError:
                rendered = orjson.dumps(line, option=_OPTIONS, default=str)
            writer.msg(rendered)

        emit.__name__ = name
        return emit

    def bind_mapping(self: Any, context: Mapping[str, Any]) -> Any:
        """`bind(**context)` for a context collected in a dict, without the keyword
        round trip: ~6,600 instructions against bind()'s ~14,700 (callgrind)."""
        return self.__class__(self._logger, self._processors, {**self._context, **context})

    methods: dict[str, Any] = {
        "bind_mapping": bind_mapping,
    }
    methods |= {
        name: direct(level, name)
        for level, name in (
            (logging.DEBUG, "debug"),
            (logging.INFO, "info"),
            (logging.WARNING, "warning"),
            (logging.ERROR, "error"),
        )
        if level >= min_level
    }
    return type(f"Direct{base.__name__}", (base,), methods)


class LineWriter:
    """structlog's logger: rendered lines to fd 1, optionally buffered until `flush()`."""

    def __init__(self, fd: int = 1) -> None:
        self._fd = fd
        self._buf = bytearray()
        self.buffered = False
        self.stamp = ""  # the timestamp of the lines buffered since the last flush
        self.dropped = 0  # lines lost to write errors (EPIPE, EAGAIN on a shared fd)

    def msg(self, message: bytes) -> None:
        self._buf += message
        self._buf += b"\n"
        if not self.buffered or len(self._buf) >= _BUFFER_LIMIT:
            self.flush()

    debug = info = warning = warn = error = exception = critical = log = msg

    def flush(self) -> None:
        """Write whole lines, at most PIPE_BUF bytes a write: several workers share the
        same stdout pipe, and only writes up to PIPE_BUF are never interleaved."""
        self.stamp = ""
        buf = self._buf
        while buf:
            cut = len(buf) if len(buf) <= _PIPE_BUF else buf.rfind(b"\n", 0, _PIPE_BUF) + 1
            if cut <= 0:
                cut = buf.find(b"\n") + 1 or len(buf)  # one line longer than PIPE_BUF
            try:
                n = os.write(self._fd, buf[:cut])
            except OSError:
                # Logging must never take a worker down: count what is lost and go on.
                self.dropped += buf.count(b"\n")
                buf.clear()
                return
            del buf[:n]


_WRITER = LineWriter()


_DIRECT = {name: _direct_logger(level) for name, level in _LEVELS.items()}


def configure(level: str = "info") -> None:
    """Configure structlog for this process (call again to change the level)."""
    structlog.configure(
        processors=_CHAIN,
        wrapper_class=_DIRECT[level],
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
