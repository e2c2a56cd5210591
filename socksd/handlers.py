"""What an event loop calls on a registered file object, in both kinds of process.

Owns: the `Handler` interface that the supervisor's selector loop and every worker's
epoll loop dispatch to, and the bases of handlers registered for one direction only.
Must not: know any loop, socket or protocol.
"""

from __future__ import annotations

from typing import Protocol


class Handler(Protocol):
    """Readiness callbacks; `on_crash` gets what either of them raised."""

    def on_readable(self) -> None: ...
    def on_writable(self) -> None: ...
    def on_crash(self, exc: BaseException) -> None: ...


class ReadOnlyHandler:
    """A handler registered for EVENT_READ only: a write event is a loop bug."""

    __slots__ = ()

    def on_writable(self) -> None:  # pragma: no cover - registered for read only
        raise AssertionError(f"{type(self).__name__} registered for write")


class WriteOnlyHandler:
    """A handler registered for EVENT_WRITE only: a read event is a loop bug."""

    __slots__ = ()

    def on_readable(self) -> None:  # pragma: no cover - registered for write only
        raise AssertionError(f"{type(self).__name__} registered for read")
