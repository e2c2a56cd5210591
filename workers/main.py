"""A worker process's life: boot, serve until told to stop, clean up.

Owns: signal handling inside the worker, process title, log context, building the
per-worker singletons and the acceptors.
Must not: parse configuration (it receives a validated `Config`) or open listeners.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

import setproctitle

from socksd import logs
from socksd.config import Config, ListenAddress
from socksd.kernel import KernelSettings, check, read_kernel_settings
from socksd.listeners import describe
from socksd.policy import EgressPolicy
from workers.acceptor import Acceptor
from workers.authenticator import Authenticator
from workers.context import WorkerContext
from workers.loop import EVENT_READ, Loop
from workers.pressure import PortPressure
from workers.resolver import Resolver


class _SignalWatch:
    """Wakes the loop when a signal arrives; the handlers themselves do nothing."""

    def __init__(self, loop: Loop) -> None:
        self._loop = loop
        self._rsock, self._wsock = socket.socketpair()
        self._rsock.setblocking(False)
        self._wsock.setblocking(False)
        self.received: int | None = None
        signal.set_wakeup_fd(self._wsock.fileno(), warn_on_full_buffer=False)
        self.snapshot_requested = False
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, _ignore)
        loop.register(self._rsock, EVENT_READ, self)

    def on_readable(self) -> None:
        try:
            data = self._rsock.recv(64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.received = signum
                self._loop.stop()
            elif signum == signal.SIGUSR1:
                self.on_usr1()

    def on_usr1(self) -> None:
        """Replaced by the worker: log the egress figures now."""

    def on_writable(self) -> None:  # pragma: no cover - registered for read only
        raise AssertionError("signal watch registered for write")

    def on_crash(self, exc: BaseException) -> None:
        raise exc

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self._loop.unregister(self._rsock)
        self._rsock.close()
        self._wsock.close()


def _report_kernel(log: Any, settings: KernelSettings, listeners: list[socket.socket]) -> None:
    """One `kernel_settings` event, then one warning per setting that costs capacity."""
    log.info("kernel_settings", **settings.as_log())
    bound = [ListenAddress(*_host_port(sock)) for sock in listeners]
    for event, fields in check(settings, bound):
        log.warning(event, **fields)


def _host_port(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return host, port


def _ignore(signum: int, frame: Any) -> None:
    return None  # the wakeup fd carries the signal to the loop


def run_worker(config: Config, listeners: list[socket.socket], slot: int = 0) -> int:
    """Serve SOCKS clients on `listeners` until SIGTERM/SIGINT; return the exit code."""
    setproctitle.setproctitle(f"socksd: worker {slot}")
    logs.bind_process(role="worker", worker=slot, pid=os.getpid())
    log = logs.get_logger()
    loop = Loop()
    resolver = Resolver(loop, config.resolver.threads)
    authenticator = (
        Authenticator(config.auth.users, resolver) if config.auth.method == "password" else None
    )
    settings = read_kernel_settings()
    pressure = PortPressure(
        settings, config.egress.pressure_threshold, config.egress.max_tracked_targets, log
    )
    ctx = WorkerContext(
        loop, config, resolver, authenticator, log, pressure, EgressPolicy(config.egress.mappings)
    )
    watch = _SignalWatch(loop)

    def log_egress_stats() -> None:
        log.info("egress_stats", **pressure.snapshot(loop.now).to_dict())

    watch.on_usr1 = log_egress_stats  # type: ignore[method-assign]
    acceptors = [Acceptor(ctx, sock, describe(sock)) for sock in listeners]
    _report_kernel(log, settings, listeners)
    log.info(
        "worker_ready",
        listen=[a.address for a in acceptors],
        auth=config.auth.method,
        config=config.source,
    )
    try:
        loop.run()
    finally:
        for acceptor in acceptors:
            acceptor.close()
        for conn in list(ctx.open):
            conn.close("worker_stopping", abortive=True)
        log_egress_stats()
        watch.close()
        resolver.close()
        loop.close()
    log.info("worker_stopped", signal=watch.received)
    return 0
