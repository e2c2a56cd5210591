"""structlog set-up: one JSON object per line on stdout, rendered by orjson.

Owns: processor chain, level filtering, the process-wide context (role, worker, pid).
Must not: format data into event names; every fact goes into a key.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
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


def _lead_with_event(logger: Any, name: str, event: MutableMapping[str, Any]) -> dict[str, Any]:
    # Operators scan lines by time, level and event name: put those first.
    return {
        "timestamp": event.pop("timestamp", None),
        "level": event.pop("level", None),
        "event": event.pop("event", None),
        **event,
    }


def configure(level: str = "info") -> None:
    """Configure structlog for this process (call again after a fork to rebind)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _lead_with_event,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.BytesLoggerFactory(sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )


def bind_process(**context: Any) -> None:
    """Bind context that every event of this process carries (role, worker, pid)."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**context)


def get_logger(**initial: Any) -> Any:
    """Return a logger with `initial` bound once (e.g. conn_id, client)."""
    return structlog.get_logger().bind(**initial)
