"""Name resolution off the loop: `getaddrinfo` in a small thread pool.

Owns: the resolver threads and posting their results back to the loop.
Must not: touch sessions' sockets; the answer goes to a callback on the loop thread.

`getaddrinfo` blocks (files, DNS, nsswitch), so it never runs on the loop thread. A
session that closes while its lookup runs simply ignores the late answer.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from workers.loop import Loop

# (family, sockaddr) pairs as getaddrinfo returns them, duplicates removed, order kept.
Addresses = list[tuple[socket.AddressFamily, tuple[Any, ...]]]
ResolveCallback = Callable[[Addresses | None, BaseException | None], None]


def _lookup(host: str, port: int) -> Addresses:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: set[tuple[Any, ...]] = set()
    out: Addresses = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        key = (family, sockaddr[:2])
        if key in seen:
            continue
        seen.add(key)
        out.append((family, sockaddr[:2]))
    return out


class Resolver:
    """Runs lookups in threads and delivers results on the loop thread."""

    def __init__(self, loop: Loop, threads: int) -> None:
        self._loop = loop
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="resolver")

    def resolve(self, host: str, port: int, callback: ResolveCallback) -> None:
        """Resolve `host` for TCP; `callback(addresses, error)` runs on the loop."""
        future = self._pool.submit(_lookup, host, port)
        future.add_done_callback(lambda f: self._loop.call_soon_threadsafe(_deliver, f, callback))

    def run_blocking(
        self, fn: Callable[..., Any], callback: Callable[..., None], *args: Any
    ) -> None:
        """Run a blocking pure function (e.g. a password hash) off the loop.

        `callback(result, error)` runs on the loop thread.
        """
        future = self._pool.submit(fn, *args)
        future.add_done_callback(lambda f: self._loop.call_soon_threadsafe(_deliver, f, callback))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _deliver(future: Future[Any], callback: Callable[..., None]) -> None:
    if future.cancelled():
        return  # the worker is shutting down
    error = future.exception()
    try:
        if error is not None:
            callback(None, error)
        else:
            callback(future.result(), None)
    except Exception as exc:
        # Route the failure to the callback's owner (a session closes itself), not to
        # the loop's anonymous "callback crashed" line.
        on_crash = getattr(getattr(callback, "__self__", None), "on_crash", None)
        if on_crash is None:
            raise
        on_crash(exc)
