"""A worker process's life: boot, serve until told to stop, drain, clean up.

Owns: signal handling inside the worker, process title, log context, building the
per-worker singletons, the acceptors, the reporter and the supervisor's channel
(reloads: `workers.reload`), graceful drain.
Must not: parse configuration (it receives a validated `Config`) or open listeners.

Signals: TERM/INT stop accepting and let open connections finish within
`shutdown_timeout`, then cut the rest; QUIT stops at once; USR1 logs `egress_stats`.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

import setproctitle

from socksd import logs
from socksd.config import Config
from socksd.kernel import KernelSettings, read_kernel_settings
from socksd.listeners import bound, describe
from socksd.signals import SignalPipe
from workers import sweeps
from workers.acceptor import Acceptor
from workers.accounting import Ledger
from workers.context import WorkerContext
from workers.counters import WorkerCounters
from workers.limits import Limits
from workers.loop import EVENT_READ, Loop
from workers.pressure import PortPressure
from workers.reload import WorkerChannel
from workers.reporter import Reporter
from workers.resolver import Resolver

_DRAIN_POLL = 0.1
_FINAL_REPORT_TIMEOUT = 2.0  # per send, for the last usage report at exit
_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1)


def _context(
    config: Config, listeners: list[socket.socket], loop: Loop, log: Any, settings: KernelSettings
) -> WorkerContext:
    """What every session of this worker shares: counters, resolver, policies, limits."""
    counters = WorkerCounters()
    resolver = Resolver(
        loop, config.resolver, connect_timeout=config.timeouts.connect, counters=counters.dns
    )
    ctx = WorkerContext(
        loop=loop,
        config=config,
        resolver=resolver,
        log=log,
        pressure=PortPressure(
            settings=settings,
            threshold=config.egress.pressure_threshold,
            max_targets=config.egress.max_tracked_targets,
            log=log,
        ),
        limits=Limits(config=config, log=log, counters=counters),
        counters=counters,
        # accounting.enabled needs a restart: the books are made here, once.
        ledger=Ledger(config.accounting.interval) if config.accounting.enabled else None,
    )
    # The bound addresses, not the configured ones: port 0 means "any".
    ctx.use_config(config, [bound(s) for s in listeners])
    if not config.relay_splice:
        ctx.pipes = None
    return ctx


class Worker:
    """Readiness handler of the signal wake-up socket, and the worker's lifecycle."""

    def __init__(
        self,
        *,
        config: Config,
        listeners: list[socket.socket],
        slot: int,
        generation: int,
        stats_fd: int | None,
        supervisor_pid: int | None,
        channel: socket.socket | None = None,
    ) -> None:
        """Build the worker's once-per-process objects; nothing runs before `run()`.

        Args:
            config: the validated configuration.
            listeners: this slot's listening sockets.
            slot: the worker's slot.
            generation: the supervisor's generation that forked it.
            stats_fd: the write end of the stats pipe; None: no supervisor reads.
            supervisor_pid: the supervisor's pid as the fork saw it (None: the parent
                as getppid() sees it when the reporter is built).
            channel: this worker's end of the supervisor's channel (reloads); None:
                no supervisor sends any.
        """
        self.log = logs.get_logger()
        self.loop = loop = Loop()
        self.settings = read_kernel_settings()
        self.ctx = ctx = _context(config, listeners, loop, self.log, self.settings)
        self.resolver = ctx.resolver
        self.pressure = ctx.pressure
        self.sweeps = sweeps.start(
            loop, handshakes=ctx.handshakes, open_conns=ctx.open, config=config, ledger=ctx.ledger
        )
        self.reporter = Reporter(
            loop=loop,
            fd=stats_fd,
            counters=self.ctx.counters,
            pressure=self.pressure,
            open_conns=self.ctx.open,
            slot=slot,
            generation=generation,
            interval=config.stats.interval,
            on_orphaned=self._orphaned,
            supervisor_pid=supervisor_pid,
            ledger=ctx.ledger,
        )
        self.signals = SignalPipe(_HANDLED, self.on_signal)
        self.signals.install()
        loop.register(self.signals.r, EVENT_READ, self.signals)
        self.listeners = listeners
        self.acceptors = [Acceptor(self.ctx, sock, describe(sock)) for sock in listeners]
        self.stop_signal: int | None = None
        self._drain_deadline: float | None = None
        self.channel = None if channel is None else WorkerChannel(self, channel)
        self.reporter.usage_sink = self.channel

    @property
    def config(self) -> Config:
        """The config in force (a reload replaces it in the context)."""
        return self.ctx.config

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    # -- signals --------------------------------------------------------------------

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGUSR1:
            self.log_egress_stats()
        elif signum == signal.SIGQUIT:
            self.stop_signal = signum
            self.loop.stop()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.stop_signal = signum
            self._start_drain()

    # -- lifecycle ------------------------------------------------------------------

    def log_egress_stats(self) -> None:
        self.log.info("egress_stats", **self.pressure.snapshot(self.loop.now).to_dict())

    def drain(self) -> None:
        """Stop accepting and exit once the open connections are done (or cut at
        `shutdown_timeout`): as SIGTERM does."""
        self.stop_signal = self.stop_signal or signal.SIGTERM
        self._start_drain()

    def _orphaned(self) -> None:
        self.log.warning("supervisor_gone", action="stopping")
        self.stop_signal = signal.SIGTERM
        self._start_drain()

    def _start_drain(self) -> None:
        if self._drain_deadline is not None:
            return
        for acceptor in self.acceptors:
            acceptor.close()  # the supervisor keeps the socket: its queue survives
        self.acceptors = []
        timeout = self.ctx.config.shutdown_timeout  # a reload may have changed it
        self._drain_deadline = self.loop.now + timeout
        self.ctx.draining = True
        # A kept-alive HTTP connection between requests closes now (an HTTP client
        # retries on a new one); one with a request under way closes after its response.
        for conn in [c for c in self.ctx.open if getattr(c, "between_requests", False)]:
            conn.close("worker_draining")
        self.log.info("worker_draining", open=len(self.ctx.open), timeout_s=timeout)
        self._check_drained()

    def _check_drained(self) -> None:
        assert self._drain_deadline is not None
        if not self.ctx.open or self.loop.now >= self._drain_deadline:
            self.loop.stop()
            return
        self.loop.call_later(_DRAIN_POLL, self._check_drained)

    def run(self) -> int:
        self.log.info(
            "worker_ready",
            listen=[a.address for a in self.acceptors],
            auth=self.config.auth.method,
            config=self.config.source,
        )
        self.reporter.start()
        logs.set_buffered(True)
        self.loop.tick_hooks.append(logs.flush)
        try:
            self.loop.run()
        finally:
            for acceptor in self.acceptors:
                acceptor.close()
            cut = len(self.ctx.open)
            for conn in list(self.ctx.open):
                conn.close("worker_stopping", abortive=True)
            self.log_egress_stats()
            self.reporter.bye()
            if self.channel is not None:
                # The last usage report: the supervisor's totals end exact.
                self.channel.flush_blocking(_FINAL_REPORT_TIMEOUT)
                self.channel.close()
            self.loop.unregister(self.signals.r)
            self.signals.close()
            self.resolver.close()
            if self.ctx.pipes is not None:
                self.ctx.pipes.close()
            self.loop.close()
        self.log.info("worker_stopped", signal=self.stop_signal, cut_connections=cut)
        logs.set_buffered(False)
        return 0


def run_worker(
    config: Config,
    listeners: list[socket.socket],
    slot: int = 0,
    generation: int = 1,
    stats_fd: int | None = None,
    supervisor_pid: int | None = None,
    channel: socket.socket | None = None,
) -> int:
    """Serve SOCKS clients on `listeners` until told to stop; return the exit code."""
    setproctitle.setproctitle(f"socksd: worker {slot}")
    logs.bind_process(role="worker", worker=slot, gen=generation, pid=os.getpid())
    worker = Worker(
        config=config,
        listeners=listeners,
        slot=slot,
        generation=generation,
        stats_fd=stats_fd,
        supervisor_pid=supervisor_pid,
        channel=channel,
    )
    return worker.run()
