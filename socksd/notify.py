"""The systemd readiness protocol (sd_notify(3)), without libsystemd.

Owns: formatting "KEY=value" state datagrams and sending them, one per call, to the
AF_UNIX datagram socket named by ``$NOTIFY_SOCKET``; removing that variable so that
workers never notify.
Must not: raise or block (a failed notification is returned as False for the caller
to log), log, or decide *when* to notify (that is the supervisor's job).

Protocol facts (sd_notify(3), systemd.service(5)):

- ``$NOTIFY_SOCKET`` is an absolute path, or "@name" for a Linux abstract socket
  (the "@" stands for a leading NUL byte). Unset means "not run by systemd": no-op.
- One datagram carries newline-separated ``KEY=value`` assignments; a newline inside a
  value would forge another assignment, so such a message is refused.
- With ``NotifyAccess=main`` systemd drops datagrams from any PID other than the main
  one; workers additionally lose the variable via `unset_environment()`.
- ``RELOADING=1`` must carry ``MONOTONIC_USEC`` (CLOCK_MONOTONIC in µs) for
  ``Type=notify-reload`` (systemd >= 253), which matches it against the reload request.

Usage in the supervisor: build the `Notifier` first, then call `unset_environment()`
before the first fork; the instance keeps the address, the children's environment
does not have it.
"""

from __future__ import annotations

import os
import socket
import time

ENV_VAR = "NOTIFY_SOCKET"


def _target(address: str) -> str | None:
    """The sendto() address for `address`, or None if it is not a supported form."""
    if address.startswith("@") and len(address) > 1:
        return "\0" + address[1:]  # Linux abstract namespace: leading NUL, no file
    if address.startswith("/"):
        return address
    return None  # relative path, "vsock:..." (systemd >= 254): unsupported, no-op


def _line(key: str, value: str | int) -> str | None:
    """One ``KEY=value`` assignment, or None if it would corrupt the datagram."""
    text = str(int(value)) if isinstance(value, int) else value  # bool -> "1"/"0"
    if not key or "=" in key or "\n" in key or "\n" in text:
        return None
    return f"{key}={text}"


class Notifier:
    """Sends state changes to the service manager; a no-op without ``$NOTIFY_SOCKET``.

    A plain slotted class rather than a frozen dataclass: it is a handle on the outside
    world whose constructor reads the environment, not a value to compare or copy.
    Each call opens its own non-blocking socket, so an instance is fork-safe and holds
    no file descriptor between calls.
    """

    __slots__ = ("_address", "_target")

    def __init__(self, address: str | None = None) -> None:
        """Resolve where notifications go.

        Args:
            address: an absolute socket path or "@abstract-name"; None reads
                ``$NOTIFY_SOCKET``. Empty, unset or unsupported makes every call a no-op.
        """
        if address is None:
            address = os.environ.get(ENV_VAR, "")
        self._address = address
        self._target = _target(address) if address else None

    @property
    def address(self) -> str:
        """The address as given ("" when notifications are off)."""
        return self._address

    @property
    def enabled(self) -> bool:
        """Whether calls try to send at all."""
        return self._target is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram with every field, in argument order.

        Args:
            **fields: assignments such as ``READY=1`` or ``STATUS="serving"``.

        Returns:
            True if the datagram was handed to the kernel; False when notifications are
            off, a field is malformed (empty, "=" in a key, newline anywhere), or the
            send failed (no listener, queue full: EAGAIN, ...). Never raises.
        """
        if self._target is None or not fields:
            return False
        lines = [_line(key, value) for key, value in fields.items()]
        if any(line is None for line in lines):
            return False
        text = "\n".join(line for line in lines if line is not None)
        try:
            payload = text.encode()  # UnicodeEncodeError (a ValueError): lone surrogates
            # SOCK_NONBLOCK: a wedged manager must never stall the supervisor's loop;
            # SOCK_CLOEXEC: the fd must not leak into anything we exec.
            with socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
            ) as sock:
                sock.sendto(payload, self._target)
        except (OSError, ValueError):  # ValueError also: NUL byte inside a path
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup finished (``READY=1``), optionally with a status line."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def reloading(self) -> bool:
        """A reload started (``RELOADING=1`` + ``MONOTONIC_USEC``); send `ready()` after."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self) -> bool:
        """Shutdown started (``STOPPING=1``)."""
        return self.notify(STOPPING=1)

    def status(self, text: str) -> bool:
        """Free-form status shown by ``systemctl status`` (``STATUS=``)."""
        return self.notify(STATUS=text)

    def mainpid(self, pid: int) -> bool:
        """Tell the manager which PID is the main process (``MAINPID=``)."""
        return self.notify(MAINPID=pid)


def unset_environment() -> None:
    """Remove ``$NOTIFY_SOCKET`` from this process, so children never see it."""
    os.environ.pop(ENV_VAR, None)
