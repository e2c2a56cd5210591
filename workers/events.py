"""The facts several worker modules report, each spelled once.

Owns: `Refused` (why a request gets a failure reply, from whichever module decided
it), the `tunnel_closed` line every connection past its request ends with (session,
relay, UDP association) and the `tunnel_usage` records of long ones,
`errno_name()` (how an OS error is named in reasons and fields), and `LogGate` (the
rate limit of warnings that load can repeat).
Must not: decide anything, or hold state beyond a gate's two numbers.
"""

from __future__ import annotations

import errno
from typing import Any

from socksd.codec import Reply

# Seconds between two lines of one rate-limited warning, unless its module says otherwise.
LOG_INTERVAL = 10.0


def errno_name(err: int | None) -> str:
    """`econnreset` for ECONNRESET; the number for one Linux does not name; `error`
    when there is none (an OSError raised without errno)."""
    if not err:
        return "error"
    return errno.errorcode.get(err, str(err)).lower()


class Refused(Exception):
    """A request refused before its tunnel opened: the reply code owed to the client,
    the `reason` of its `tunnel_closed` line and that line's extra fields."""

    def __init__(self, reply: Reply, reason: str, **fields: Any) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason
        self.fields = fields


def tunnel_closed(
    log: Any,
    reason: str,
    started: float,
    now: float,
    bytes_up: int = 0,
    bytes_down: int = 0,
    reply: int = 0,
    unreported: tuple[int, ...] | None = None,
    **fields: Any,
) -> None:
    """The one line of a connection that got past its request, however it ended.

    `started`/`now` are loop times; a refused request has `reply` != 0 and no bytes.
    `unreported`: of a tunnel that had `tunnel_usage` lines, the (up, down) bytes none
    of them gave (`unreported_up` / `unreported_down`); None (the fields absent): it
    had none, all its bytes are unreported. Summed with the `tunnel_usage` lines'
    bytes, a user's traffic over any window, exactly.
    """
    duration_ms = round((now - started) * 1000, 1)
    if not fields and unreported is None:
        # Plain keywords: a **fields call takes CALL_FUNCTION_EX and a second dict,
        # ~1,500 more instructions per tunnel under callgrind (the relay's line).
        log.info(
            "tunnel_closed",
            reply=reply,
            reason=reason,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            duration_ms=duration_ms,
        )
        return
    if not fields and unreported is not None:
        log.info(
            "tunnel_closed",
            reply=reply,
            reason=reason,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            unreported_up=unreported[0],
            unreported_down=unreported[1],
            duration_ms=duration_ms,
        )
        return
    line = {"reply": reply, "reason": reason, "bytes_up": bytes_up, "bytes_down": bytes_down}
    if unreported is not None:
        line["unreported_up"], line["unreported_down"] = unreported
    log.info("tunnel_closed", **line, duration_ms=duration_ms, **fields)


def tunnel_usage(log: Any, started: float, now: float, fields: dict[str, int]) -> None:
    """A long tunnel's interim record: the bytes since its previous one (`fields`)."""
    log.info("tunnel_usage", **fields, duration_ms=round((now - started) * 1000, 1))


class LogGate:
    """Lets one line through per interval and counts the ones it held back."""

    __slots__ = ("next_at", "suppressed")

    def __init__(self) -> None:
        self.next_at = 0.0
        self.suppressed = 0

    def open(self, now: float, interval: float = LOG_INTERVAL) -> int | None:
        """None: stay quiet (counted). Otherwise log now, with the returned number of
        lines held back since the last one."""
        if now < self.next_at:
            self.suppressed += 1
            return None
        self.next_at = now + interval
        held, self.suppressed = self.suppressed, 0
        return held
