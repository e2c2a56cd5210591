"""A reload inside a running worker: the new config in place, between two loop passes.

Owns: the worker's end of the supervisor's channel (`socksd.channel`: reloads, usage
reports out, tunnel queries answered by `workers.tunnels`); swapping the
config-derived objects every session reads from the context (policies, limits, the
authenticator's users, resolver settings, sweep timeouts, log level, stats interval);
opening acceptors on listen addresses a reload added and closing those of removed
ones; re-checking every open connection and revoking those the new config refuses;
the `reload_applied` event and the answer to the supervisor.
Must not: parse or validate configuration (the supervisor sent a validated `Config`),
decide what a grant allows (`socksd.revocation` does), or close a connection other
than through its own `revoke()`, which logs its line.

The whole swap runs in one loop callback, so no session sees half of a config: one
that reads `ctx.config` before it sees the old one, after it the new one.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Protocol

from socksd import logs
from socksd.channel import ANSWER, APPLIED, CONFIG, QUERY, USAGE, Channel, ChannelError, Frame
from socksd.config import Config
from socksd.listeners import bound, describe
from socksd.revocation import Grant, revoked_by
from socksd.usage import Report
from workers import admission, sweeps, tunnels
from workers.acceptor import Acceptor
from workers.context import WorkerContext
from workers.loop import EVENT_READ, EVENT_WRITE
from workers.reporter import Reporter
from workers.session import Phase, Session
from workers.sweeps import Sweep
from workers.udp import UdpAssociation


class Revocable(Protocol):
    def granted(self) -> Grant: ...

    def revoke(self, by: str) -> None: ...


class Reloadable(Protocol):
    """What a reload changes in the worker (`workers.main.Worker`)."""

    ctx: WorkerContext
    acceptors: list[Acceptor]
    sweeps: tuple[Sweep, ...]
    reporter: Reporter
    log: Any

    @property
    def draining(self) -> bool: ...

    def drain(self) -> None: ...


def apply(
    worker: Reloadable,
    config: Config,
    listen: list[tuple[str, int]],
    new_listeners: list[socket.socket],
) -> dict[str, Any]:
    """Make `config` the worker's; `listen`: every listen address as bound after the
    reload; `new_listeners`: this slot's sockets of the addresses it added.

    Returns:
        The answer to the supervisor: the reload's figures in this worker.
    """
    started = time.monotonic()
    ctx = worker.ctx
    old = ctx.config
    if config.log.level != old.log.level:
        logs.configure(config.log.level)
        # Loggers made earlier keep the level they were made with: renew the long-lived
        # ones (connections open before the reload keep theirs).
        worker.log = ctx.log = ctx.limits.log = ctx.pressure.log = logs.get_logger()
    _listeners(worker, listen, new_listeners)
    dropped = ctx.use_config(config, listen)
    ctx.limits.reconfigure(config)
    ctx.pressure.retune(config.egress.pressure_threshold, config.egress.max_tracked_targets)
    ctx.resolver.reconfigure(config.resolver, connect_timeout=config.timeouts.connect)
    sweeps.retime(worker.sweeps, config)
    if ctx.ledger is not None:
        ctx.ledger.interval = config.accounting.interval
    worker.reporter.interval = config.stats.interval
    checked = len(ctx.open)
    revoked = _recheck(ctx, auth_changed=config.auth.method != old.auth.method)
    result = {
        "revoked": revoked,
        "checked": checked,
        "credentials_dropped": dropped,
        "listen": [f"{host}:{port}" for host, port in listen],
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
    }
    worker.log.info("reload_applied", **result)
    return result


def _listeners(worker: Reloadable, listen: list[tuple[str, int]], new: list[socket.socket]) -> None:
    """Close the acceptors of removed addresses (their open tunnels stay), open those
    of added ones."""
    keep = set(listen)
    for acceptor in [a for a in worker.acceptors if bound(a.sock) not in keep]:
        acceptor.close()
        worker.acceptors.remove(acceptor)
    for sock in new:
        if worker.draining or bound(sock) not in keep:
            sock.close()  # a stopping worker accepts nothing new
        else:
            worker.acceptors.append(Acceptor(worker.ctx, sock, describe(sock)))


def _recheck(ctx: WorkerContext, *, auth_changed: bool) -> dict[str, int]:
    """Revoke every open connection the new config refuses; counts by `revoked_by`."""
    config = ctx.config
    revoked: dict[str, int] = {}
    for conn in list(ctx.open):
        session = conn if type(conn) is Session else None
        if session is not None and session.phase is Phase.DRAINING:
            continue  # its failure reply is sent: it ends anyway
        grant = conn.granted()
        by = revoked_by(grant, config, ctx.clients, ctx.destinations, ctx.client_users)
        if by is None and auth_changed and session is not None and session.method_chosen:
            by = "auth.method"  # its greeting chose a method no longer offered
        if by is not None:
            conn.revoke(by)
            revoked[by] = revoked.get(by, 0) + 1
        elif type(conn) is UdpAssociation:
            conn.user_rules = admission.user_rules(ctx, grant.user)
        elif session is not None:
            session.refilter()  # addresses still to try, under the new rules
    return revoked


class WorkerChannel:
    """Loop handler of the worker's end of the supervisor's channel."""

    __slots__ = ("_worker", "_channel", "_mask")

    def __init__(self, worker: Reloadable, sock: socket.socket) -> None:
        self._worker = worker
        self._channel = Channel(sock)
        self._mask = 0
        self._update()

    def on_readable(self) -> None:
        try:
            frames = self._channel.read()
        except ChannelError as exc:
            # No reload can reach this worker any more: it would serve an old config
            # (removed users working on): drain, so that the slot respawns.
            self._worker.log.error("channel_broken", error=str(exc), action="draining")
            self.close()
            self._worker.drain()
            return
        if frames is None:  # the supervisor is gone: the reporter notices and drains
            self.close()
            return
        for frame in frames:
            self._handle(frame)
        self._update()

    def on_writable(self) -> None:
        try:
            self._channel.write()
        except OSError:
            self.close()
            return
        self._update()

    def on_crash(self, exc: BaseException) -> None:
        raise exc  # a reload that fails half-way is the worker's bug: let it restart

    def _handle(self, frame: Frame) -> None:
        if frame.kind == QUERY and not frame.fds:
            found = tunnels.answer(self._worker.ctx, frame.body)
            self._channel.send(ANSWER, {"id": frame.body.get("id"), "tunnels": found})
            return
        if frame.kind != CONFIG:
            for fd in frame.fds:
                os.close(fd)
            self._worker.log.warning("channel_frame_unknown", kind=frame.kind)
            return
        body = frame.body
        socks = [socket.socket(fileno=fd) for fd in frame.fds]
        for sock in socks:
            sock.setblocking(False)
        result = apply(self._worker, body["config"], body["listen"], socks)
        result["reload"] = body["reload"]
        self._channel.send(APPLIED, result)

    @property
    def idle(self) -> bool:
        """Open, with nothing queued: a usage report sent now leaves at once."""
        channel = self._channel
        return not (channel.closed or channel.eof or channel.wants_write())

    def send_usage(self, report: Report) -> None:
        """Queue a usage report (`socksd.usage`) and send what the socket takes."""
        if self._channel.closed or self._channel.eof:
            return
        self._channel.send(USAGE, report)
        self.on_writable()

    def flush_blocking(self, timeout: float) -> None:
        """At exit: send what is still queued (the last usage report)."""
        if not (self._channel.closed or self._channel.eof):
            self._channel.flush_blocking(timeout)

    def _update(self) -> None:
        if self._channel.closed or self._channel.eof:
            return
        want = EVENT_READ | (EVENT_WRITE if self._channel.wants_write() else 0)
        loop = self._worker.ctx.loop
        self._mask = loop.set_interest(self._channel.fileno(), self._mask, want, self)

    def close(self) -> None:
        if self._mask:
            self._worker.ctx.loop.forget(self._channel.fileno())
            self._mask = 0
        self._channel.close()
