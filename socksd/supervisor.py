"""The supervisor: one worker process per slot on shared SO_REUSEPORT listeners.

Owns: listeners (opened before any fork, kept open so no accept queue is ever reset),
raising the soft fd limit first (through socksd.kernel) so every worker inherits it,
forking and replacing workers, reloads (the new config sent to the running workers
over each one's channel, their answers gathered into one `reload_done`), signals,
reading the workers' stats pipes and usage reports, tunnel queries to the workers
(`socksd tunnels`, `socksd kick`), the control socket, systemd notifications.
Must not: know SOCKS, or what a stats line holds and how figures are summed
(socksd.stats does). The worker's entry point is injected by `socksd.cli`.

Signals wake this process's own selector loop (the handlers do nothing): TERM/INT
drain and exit 0, QUIT stops at once, HUP reloads (as `socksd reload` does), CHLD
reaps, USR1 makes every worker log its `egress_stats`.

A reload replaces no worker: each gets the new config (and this slot's sockets of any
new listen address) on its channel, swaps it in, revokes the connections the new
config refuses and answers; `reload_done` follows the last answer. Only a change in
the number of workers spawns (or drains) the slots concerned.

The loop (`run()`): wait up to 0.25 s for a signal, a stats line or a control
request; reap exited workers; then `tick()`, one pass of named steps, each of which
checks its own due time.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import setproctitle

from socksd import logs, metrics, notify, reloading, stats, usage
from socksd.channel import ANSWER, APPLIED, CONFIG, QUERY, USAGE, Channel, ChannelError, Frame
from socksd.config import Config, ListenAddress, users_file_path
from socksd.control import (
    Endpoint,
    control_responder,
    metrics_responder,
    open_control_socket,
    open_metrics_socket,
)
from socksd.errors import EXIT_BOOT, EXIT_OK, SocksdError
from socksd.fanout import Fanout
from socksd.kernel import check, check_nofile, raise_nofile_soft, read_kernel_settings
from socksd.listeners import bound, close_all, describe, grow_slots, open_slot_listeners
from socksd.policy import EgressPolicy, family_of
from socksd.signals import SignalPipe
from socksd.stats import Aggregate, SupervisorFacts, WorkerView, add_counters
from socksd.timewait import TimeWaitSample, sample_time_wait

WorkerEntry = Callable[[Config, list[socket.socket], int, int, int, int, socket.socket], int]
Loader = Callable[[], Config]
ReloadWaiter = Callable[[dict[str, Any]], None]  # gets the reload's outcome
_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGCHLD,
    signal.SIGUSR1,
)
_KILL_GRACE = 5.0  # after TERM to a hung worker, or past the drain deadline
# ~0.5 us a row: a sample never holds the supervisor's loop for more than ~0.1 s.
_TIMEWAIT_ROWS = 200_000
# A worker that has not applied a reload this long after it was sent is reported as
# not answering (`reload_done` names it); the heartbeat watch deals with a hung one.
_RELOAD_ANSWER_TIMEOUT = 10.0
# auth.watch: how often the users file is stat()ed (a change reaches the workers
# within this plus the reload's own time).
_WATCH_INTERVAL = 0.5


@dataclass(eq=False)
class Proc:
    """One worker process as the supervisor sees it."""

    view: WorkerView
    pipe: int  # the read end of its stats pipe; -1 once closed
    link: Channel | None = None  # its reload channel; None once closed
    term_at: float | None = None  # when we sent SIGTERM
    kill_after: float = 0.0


@dataclass
class Slot:
    """A place for one worker of the current generation (its listening sockets' index)."""

    index: int
    proc: Proc | None = None
    failures: int = 0  # quick deaths in a row; a worker that lived 10 s resets it
    spawn_at: float | None = 0.0  # when to (re)spawn; None: a worker is running


@dataclass(eq=False)
class _Pipe:
    """Readiness handler of one worker's stats pipe in the supervisor's selector."""

    proc: Proc
    sup: Supervisor = field(repr=False)

    def on_readable(self) -> None:
        self.sup.read_stats(self.proc)


@dataclass(eq=False)
class _Link:
    """Readiness handler of one worker's reload channel in the supervisor's selector."""

    proc: Proc
    sup: Supervisor = field(repr=False)

    def on_readable(self) -> None:
        self.sup.read_link(self.proc)

    def on_writable(self) -> None:
        self.sup.write_link(self.proc)


@dataclass
class _Reload:
    """One reload sent to the workers, until each has answered (or gone)."""

    number: int
    started: float
    changed: list[str]
    needs_restart: list[str]
    waiting: set[int]  # pids of the workers yet to answer
    waiters: list[ReloadWaiter]
    spawned: int = 0  # slots added by a larger `workers`
    drained: int = 0  # workers told to drain: slots removed by a smaller `workers`
    revoked: dict[str, int] = field(default_factory=dict)
    answered: int = 0


class Supervisor:
    """The parent process: keeps one worker per slot alive and answers for all of them."""

    def __init__(self, config: Config, load: Loader, entry: WorkerEntry) -> None:
        """Open the listeners and the control endpoints; no worker runs before `run()`.

        Args:
            config: the validated configuration.
            load: reads and validates the configuration again (on HUP).
            entry: a worker's main, called in the forked child.

        Raises:
            SocksdError: a listen, control or metrics address cannot be opened.
        """
        self.config = config
        # Before any fd is opened or worker forked: the workers inherit the raised limit.
        self.nofile = raise_nofile_soft()
        self._load = load
        self._entry = entry
        self.log = logs.get_logger()
        self.sel = selectors.DefaultSelector()
        self.notifier = notify.Notifier()
        self.gen = 1
        self.started = time.monotonic()
        self._pid = os.getpid()
        self.procs: dict[int, Proc] = {}
        self.retired: dict[str, Any] = {}  # counters of workers that are gone
        self.usage = usage.UsageBook()  # per user and per ingress IP (channel reports)
        self.fanout = Fanout()  # tunnel queries out to the workers
        self.slots = [Slot(i) for i in range(config.worker_count)]
        self.listeners = open_slot_listeners(config.listen, config.worker_count)
        self.wake = SignalPipe(_SIGNALS, self.on_signal)
        self.sel.register(self.wake.r, selectors.EVENT_READ, self.wake)
        self._control_path = config.control.path()
        self.control = Endpoint(
            open_control_socket(self._control_path),
            self.sel,
            control_responder(self.aggregate, self.reload, self.usage_rows, self.ask_workers),
        )
        self.metrics: Endpoint | None = None
        if config.metrics_listen is not None:
            self.metrics = Endpoint(
                open_metrics_socket(config.metrics_listen),
                self.sel,
                metrics_responder(lambda: metrics.render(self.aggregate(), self.metrics_usage())),
            )
        self.time_wait = TimeWaitSample(total=0, by_pair=(), truncated=False)
        self.stopping: float | None = None  # drain deadline once stopping
        self.reloads = 0  # reloads applied (or under way) since start
        self._pending: dict[int, _Reload] = {}  # reload number -> answers awaited
        self.fatal: str | None = None
        self.ready_sent = False
        self._next = {"stats_log": 0.0, "timewait": 0.0, "status": 0.0, "watch": 0.0}
        self._users_file_seen = _file_signature(users_file_path(config))

    # -- signals ------------------------------------------------------------------------

    def on_signal(self, signum: int) -> None:
        """Act on a signal, in the loop (the handler itself only wrote a byte)."""
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stop(graceful=True)
        elif signum == signal.SIGQUIT:
            self.stop(graceful=False)
        elif signum == signal.SIGHUP and self.stopping is None:
            self.reload()
        elif signum == signal.SIGUSR1:
            for proc in self.procs.values():  # each worker logs its egress_stats
                os.kill(proc.view.pid, signal.SIGUSR1)

    def stop(self, graceful: bool) -> None:
        """Close the listeners and stop every worker: drain (graceful) or at once."""
        if self.stopping is not None and graceful:
            return
        timeout = self.config.shutdown_timeout if graceful else 0.0
        self.stopping = time.monotonic() + timeout + _KILL_GRACE
        self.notifier.stopping()
        # New clients must be refused now, not queued and reset when we exit: once the
        # workers close their copies, the kernel refuses connections to these ports.
        close_all(self.listeners)
        self.listeners = {}
        self.log.info("supervisor_stopping", graceful=graceful, workers=len(self.procs))
        for proc in self.procs.values():
            self._signal(proc, signal.SIGTERM if graceful else signal.SIGQUIT)
            proc.kill_after = self.stopping

    def reload(self, waiter: ReloadWaiter | None = None) -> None:
        """HUP or `socksd reload`: validate the config again and apply it in place.

        A config that does not validate changes nothing (`reload_failed`). Otherwise the
        settings of `reloading.RESTART_ONLY` keep their running values (and are
        named), listen sockets are opened or closed, slots are added or drained, and
        every running worker gets the new config on its channel; `waiter` (and
        `reload_done`) get the outcome once all of them answered.
        """
        if self.stopping is not None:
            # The listeners are closed so that new clients are refused: opening them
            # again would queue clients that nobody will serve.
            if waiter is not None:
                waiter({"ok": False, "error": "socksd is stopping"})
            return
        self.notifier.reloading()
        started = time.monotonic()
        # The users file as it is before it is read: a write during the read (a
        # 100,000-user file takes ~1 s) is then seen as a change by the watch.
        seen = _file_signature(users_file_path(self.config))
        try:
            loaded = self._load()
            if users_file_path(loaded) != users_file_path(self.config):
                seen = _file_signature(users_file_path(loaded))
            listeners = self._listeners_for(loaded)
        except SocksdError as exc:
            # A bad config is an operator error: its message, not a traceback.
            self.log.error("reload_failed", error=str(exc), keeping=self.config.source)
            if self.ready_sent and not self._pending:
                self.notifier.ready(self._status())
            if waiter is not None:
                waiter({"ok": False, "error": str(exc)})
            return
        self._users_file_seen = seen
        old = self.config
        new = reloading.carry_over(old, loaded)
        added = self._swap_listeners(listeners)
        if new.log.level != old.log.level:
            logs.configure(new.log.level)
            self.log = logs.get_logger()
        self.config = new
        self.reloads += 1
        pending = _Reload(
            number=self.reloads,
            started=started,
            changed=reloading.changed_sections(old, new),
            needs_restart=reloading.needs_restart(old, loaded),
            waiting=set(),
            waiters=[] if waiter is None else [waiter],
        )
        self._resize(pending, new.worker_count)
        # As the workers' sockets name themselves (an IPv4-mapped address included).
        listen = [bound(socks[0]) for socks in self.listeners.values()]
        body = {"reload": pending.number, "config": new, "listen": listen}
        # Every live worker, the draining ones too (a removed user is revoked there as
        # well); a slot waiting for its respawn forks with the new config.
        for proc in list(self.procs.values()):
            if proc.link is None:
                continue
            slot = self._slot_of(proc)
            fds = () if slot is None else tuple(s[slot.index].fileno() for s in added)
            self._send_link(proc, CONFIG, body, fds)
            if proc.link is not None:  # None: it is gone (EPIPE), no answer to wait for
                pending.waiting.add(proc.view.pid)
        self._pending[pending.number] = pending
        # The new limits may need more fds than the (unchanged) fd limit gives.
        for event, fields in check_nofile(self.nofile, new):
            if event == "nofile_limit_low":
                self.log.warning(event, **fields)
        self._finish_reload(pending)

    def _swap_listeners(
        self, listeners: dict[ListenAddress, list[socket.socket]]
    ) -> list[list[socket.socket]]:
        """Make `listeners` ours; close the sockets it dropped (a removed address, or a
        removed slot: their workers' copies keep serving tunnels already accepted).

        Returns:
            The slot sockets of each address that is new (in the same order).
        """
        old = {id(sock) for socks in self.listeners.values() for sock in socks}
        kept = {id(sock) for socks in listeners.values() for sock in socks}
        for socks in self.listeners.values():
            for sock in socks:
                if id(sock) not in kept:
                    sock.close()
        self.listeners = listeners
        return [socks for socks in listeners.values() if id(socks[0]) not in old]

    def _resize(self, pending: _Reload, count: int) -> None:
        """Add slots (spawned by the next tick) or drain the workers of removed ones."""
        while len(self.slots) < count:
            self.slots.append(Slot(len(self.slots)))
            pending.spawned += 1
        for slot in self.slots[count:]:
            if slot.proc is not None:
                self._drain(slot.proc)
                pending.drained += 1
        del self.slots[count:]

    def _drain(self, proc: Proc) -> None:
        """TERM `proc`: it stops accepting and its tunnels get `shutdown_timeout` (KILL
        after that and a grace)."""
        self._signal(proc, signal.SIGTERM)
        proc.kill_after = time.monotonic() + self.config.shutdown_timeout + _KILL_GRACE

    def read_link(self, proc: Proc) -> None:
        """A worker's answers on its channel."""
        link = proc.link
        if link is None:
            return
        try:
            frames = link.read()
        except ChannelError as exc:
            # A live worker that no reload can reach would serve an old config (users
            # removed since would keep working there): drain it; its slot respawns.
            self.log.error("channel_broken", worker=proc.view.slot, error=str(exc))
            self._close_link(proc)
            # Not a reaped one: its pid may be another process's by now.
            if proc.term_at is None and self.stopping is None and proc.view.pid in self.procs:
                self._drain(proc)
            return
        if frames is None:  # EOF: the worker is exiting (or gone); the reaper sees it
            self._close_link(proc)
            return
        self._take(proc, frames)

    def _take(self, proc: Proc, frames: list[Frame]) -> None:
        """A worker's frames: usage reports, query answers, reload answers."""
        for frame in frames:
            if frame.kind == USAGE:
                self.usage.feed(proc.view.pid, frame.body)
            elif frame.kind == ANSWER:
                self.fanout.answered(proc.view.pid, frame.body)
            elif frame.kind == APPLIED:
                self._applied(proc, frame.body)

    def write_link(self, proc: Proc) -> None:
        if proc.link is not None:
            self._flush_link(proc)

    def _send_link(self, proc: Proc, kind: int, body: Any, fds: tuple[int, ...]) -> None:
        assert proc.link is not None
        proc.link.send(kind, body, fds)
        self._flush_link(proc)

    def _flush_link(self, proc: Proc) -> None:
        link = proc.link
        assert link is not None
        try:
            link.write()
        except OSError:
            self._close_link(proc)  # the worker is gone; the reaper will see it
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.wants_write() else 0)
        key = self.sel.get_key(link.fileno())
        if key.events != events:
            self.sel.modify(link.fileno(), events, key.data)

    def _close_link(self, proc: Proc) -> None:
        link, proc.link = proc.link, None
        if link is None:
            return
        if not link.eof:
            # A write to an exiting worker failed: its last usage report may already
            # be in our receive buffer. Take it before closing.
            try:
                self._take(proc, link.read() or [])
            except ChannelError:
                pass  # nothing more can be read from it
        self.sel.unregister(link.fileno())
        link.close()
        self._forget_answers(proc)
        self.fanout.gone(proc.view.pid)

    def _applied(self, proc: Proc, body: dict[str, Any]) -> None:
        """A worker applied reload `body["reload"]`: count its figures."""
        pending = self._pending.get(body.get("reload", -1))
        if pending is None or proc.view.pid not in pending.waiting:
            return
        pending.waiting.discard(proc.view.pid)
        pending.answered += 1
        for by, n in body.get("revoked", {}).items():
            pending.revoked[by] = pending.revoked.get(by, 0) + n
        self._finish_reload(pending)

    def _forget_answers(self, proc: Proc) -> None:
        """`proc` is gone: no reload waits for its answer any more."""
        for pending in list(self._pending.values()):
            if proc.view.pid in pending.waiting:
                pending.waiting.discard(proc.view.pid)
                self._finish_reload(pending)

    def _finish_reload(self, pending: _Reload, timed_out: bool = False) -> None:
        """Once no answer is awaited: `reload_done`, READY=1, and the waiters' outcome."""
        if pending.waiting and not timed_out:
            return
        self._pending.pop(pending.number, None)
        outcome = {
            "ok": True,
            "reload": pending.number,
            "config": self.config.source,
            "listen": [self._describe(a) for a in self.listeners],
            "changed": pending.changed,
            "revoked": pending.revoked,
            "revoked_total": sum(pending.revoked.values()),
            "workers_answered": pending.answered,
            "workers_unanswered": len(pending.waiting),
            "workers_replaced": 0,
            "workers_spawned": pending.spawned,
            "workers_drained": pending.drained,
            "needs_restart": pending.needs_restart,
            "duration_ms": round((time.monotonic() - pending.started) * 1000, 1),
        }
        log = self.log.warning if pending.waiting or pending.needs_restart else self.log.info
        log("reload_done", **{k: v for k, v in outcome.items() if k != "ok"})
        if not self._pending and self.stopping is None and self.ready_sent:
            self.notifier.ready(self._status())
        for waiter in pending.waiters:
            waiter(outcome)

    def _listeners_for(self, new: Config) -> dict[ListenAddress, list[socket.socket]]:
        """The slot sockets `new` needs, reusing ours; on error close only what it opened."""
        result: dict[ListenAddress, list[socket.socket]] = {}
        # "127.0.0.1:0" in the old config and "127.0.0.1:<the port it got>" in the new
        # one are the same sockets: replacing them would reset their queued clients.
        bound = {
            ListenAddress(a.host, socks[0].getsockname()[1]): a
            for a, socks in self.listeners.items()
        }
        try:
            for address in new.listen:
                key = address if address in self.listeners else bound.get(address, address)
                have = self.listeners.get(key, [])[: new.worker_count]
                result[address] = grow_slots(address, have, new.worker_count)
        except SocksdError:
            mine = {id(sock) for socks in self.listeners.values() for sock in socks}
            for socks in result.values():
                for sock in socks:
                    if id(sock) not in mine:
                        sock.close()
            raise
        return result

    # -- workers ------------------------------------------------------------------------

    def spawn(self, slot: Slot) -> None:
        """Fork a worker into `slot`, with its stats pipe and its reload channel."""
        r, w = os.pipe()
        try:
            ours, theirs = Channel.pair()
        except OSError:
            os.close(r)
            os.close(w)
            raise  # out of fds: the tick logs it and retries
        try:
            pid = os.fork()
        except OSError:
            for fd in (r, w):
                os.close(fd)
            ours.close()
            theirs.close()
            raise
        if pid == 0:  # the child: become a worker, never return
            code = EXIT_BOOT
            try:
                os.close(r)
                ours.close()
                self._become_worker(slot.index)
                socks = [socks[slot.index] for socks in self.listeners.values()]
                code = self._entry(self.config, socks, slot.index, self.gen, w, self._pid, theirs)
            except BaseException:  # noqa: BLE001 - the child must never return to us
                traceback.print_exc()
                code = EXIT_BOOT
            finally:
                with contextlib.suppress(BaseException):
                    logs.flush()
                    sys.stdout.flush()
                os._exit(code)
        os.close(w)
        theirs.close()
        os.set_blocking(r, False)
        now = time.monotonic()
        proc = Proc(
            WorkerView(slot=slot.index, gen=self.gen, pid=pid, started=now, last_seen=now),
            r,
            Channel(ours),
        )
        self.procs[pid] = proc
        slot.proc, slot.spawn_at = proc, None
        self.sel.register(r, selectors.EVENT_READ, _Pipe(proc, self))
        self.sel.register(ours, selectors.EVENT_READ, _Link(proc, self))
        self.log.info("worker_spawned", worker=slot.index, gen=self.gen, worker_pid=pid)

    def _become_worker(self, index: int) -> None:
        """In the child: drop every supervisor fd that is not this slot's."""
        self.wake.close()  # our selector is closed below, no unregister needed
        for signum in _SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        # Until the worker has its own handlers, a forwarded USR1 or a HUP sent to the
        # whole process group must not kill it.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for socks in self.listeners.values():
            for i, sock in enumerate(socks):
                if i != index:
                    sock.close()
        for proc in self.procs.values():
            if proc.pipe >= 0:  # -1: EOF already read, the process not yet reaped
                os.close(proc.pipe)
            if proc.link is not None:
                proc.link.sock.close()
        self.control.close_all()
        if self.metrics is not None:
            self.metrics.close_all()
        self.sel.close()
        notify.unset_environment()

    def read_stats(self, proc: Proc) -> None:
        """Read what `proc` wrote to its stats pipe; at EOF close the pipe."""
        try:
            data = os.read(proc.pipe, 65536)
        except BlockingIOError:
            return
        if not data:
            self._close_pipe(proc)
            return
        for error in proc.view.feed_bytes(data, time.monotonic()):
            self.log.warning("stats_line_invalid", worker=proc.view.slot, error=error)

    def _close_pipe(self, proc: Proc) -> None:
        """Stop watching `proc`'s stats pipe and close it."""
        self.sel.unregister(proc.pipe)
        os.close(proc.pipe)
        proc.pipe = -1

    def reap(self) -> None:
        """Collect every exited worker (until none is left, or one failed to boot)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.procs.pop(pid, None)
            if proc is None:
                continue
            if not self._worker_exited(proc, os.waitstatus_to_exitcode(status)):
                return

    def _worker_exited(self, proc: Proc, code: int) -> bool:
        """Keep an exited worker's counters, log it, and schedule its slot's respawn.

        A worker that dies before its hello with the boot exit status stops the
        supervisor (exit status 3) instead of being respawned in a loop.

        Returns:
            False when that happened: the supervisor is stopping, reaping can wait.
        """
        if proc.pipe >= 0:
            self.read_stats(proc)  # the bye line, if it is still in the pipe
            if proc.pipe >= 0:
                self._close_pipe(proc)
        self.read_link(proc)  # its last usage report, if it is still in the socket
        self._close_link(proc)
        view = proc.view
        add_counters(self.retired, view.counters)
        self.usage.retire(view.pid)
        self.log.info(
            "worker_exited",
            worker=view.slot,
            gen=view.gen,
            worker_pid=view.pid,
            exit_code=code,
            lived_s=round(time.monotonic() - view.started, 1),
        )
        slot = self._slot_of(proc)
        if slot is None or self.stopping is not None:
            return True
        slot.proc = None
        if code == EXIT_BOOT and not view.hello:
            self.fatal = f"worker {view.slot} failed to boot (exit status {code})"
            # Workers that did boot (a slot added by a reload failed) may be serving
            # tunnels: let them drain.
            self.stop(graceful=any(p.view.hello for p in self.procs.values()))
            return False
        self._schedule_respawn(slot, view, code)
        return True

    def _schedule_respawn(self, slot: Slot, view: WorkerView, code: int) -> None:
        """Respawn at once after one quick death, then back off (0.5 s doubling to 30 s)."""
        quick = time.monotonic() - view.started < 10.0
        slot.failures = slot.failures + 1 if quick else 0
        delay = 0.0 if slot.failures <= 1 else min(30.0, 0.5 * 2 ** (slot.failures - 2))
        slot.spawn_at = time.monotonic() + delay
        self.log.warning("worker_died", worker=view.slot, exit_code=code, respawn_in_s=delay)

    def _slot_of(self, proc: Proc) -> Slot | None:
        """The current generation's slot `proc` occupies, or None (retired or replaced)."""
        if proc.view.slot >= len(self.slots):
            return None
        slot = self.slots[proc.view.slot]
        return slot if slot.proc is proc else None

    def _signal(self, proc: Proc, signum: int) -> None:
        """Send `signum` to `proc`; the first one starts its termination clock."""
        proc.term_at = proc.term_at or time.monotonic()
        try:
            os.kill(proc.view.pid, signum)
        except ProcessLookupError:
            pass  # already gone; the reaper will see it

    # -- periodic work ------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """One pass of the periodic work; each step checks its own due time."""
        self._spawn_due(now)
        self._watch_heartbeats(now)
        self._kill_overdue(now)
        self._expire_reloads(now)
        self.fanout.expire(now)
        self._watch_users_file(now)
        self._promote_when_ready(now)
        self._sample_time_wait(now)
        self._update_status(now)
        self._log_stats(now)

    def _spawn_due(self, now: float) -> None:
        """Fork a worker into every empty slot whose (back-off) time has come."""
        if self.stopping is not None:
            return
        for slot in self.slots:
            if slot.proc is None and slot.spawn_at is not None and now >= slot.spawn_at:
                self.spawn(slot)

    def _watch_heartbeats(self, now: float) -> None:
        """TERM a worker silent for longer than `stats.heartbeat_timeout`: it is hung."""
        hb = self.config.stats.heartbeat_timeout
        for proc in list(self.procs.values()):
            if proc.term_at is None and now - proc.view.last_seen > hb:
                self.log.error(
                    "worker_hung",
                    worker=proc.view.slot,
                    worker_pid=proc.view.pid,
                    silent_s=round(now - proc.view.last_seen, 1),
                )
                self._signal(proc, signal.SIGTERM)
                proc.kill_after = now + _KILL_GRACE

    def _kill_overdue(self, now: float) -> None:
        """KILL a worker still alive past its deadline (hung, or a drain that ran over)."""
        for proc in list(self.procs.values()):
            if proc.term_at is not None and now > proc.kill_after:
                self._signal(proc, signal.SIGKILL)

    def _expire_reloads(self, now: float) -> None:
        """A reload whose answers are overdue is done without them (and says so)."""
        for pending in list(self._pending.values()):
            if now - pending.started > _RELOAD_ANSWER_TIMEOUT:
                self._finish_reload(pending, timed_out=True)

    def _watch_users_file(self, now: float) -> None:
        """auth.watch: reload when the users file's mtime, size or inode changed (a
        provisioning system's atomic rename is a new inode)."""
        if not self.config.auth.watch or now < self._next["watch"] or self.stopping:
            return
        self._next["watch"] = now + _WATCH_INTERVAL
        seen = _file_signature(users_file_path(self.config))
        if seen != self._users_file_seen:
            self.log.info("users_file_changed", path=str(users_file_path(self.config)))
            self._users_file_seen = seen
            self.reload()

    def _promote_when_ready(self, now: float) -> None:
        """Once every slot's worker has said hello at start: send READY=1 and log
        `supervisor_ready` (once)."""
        current = [s.proc for s in self.slots]
        if self.ready_sent or not all(p is not None and p.view.hello for p in current):
            return
        self.ready_sent = True
        self.notifier.ready(self._status())
        self.log.info(
            "supervisor_ready",
            generation=self.gen,
            workers=len(current),
            listen=[self._describe(a) for a in self.listeners],
            metrics=self._metrics_address(),
        )

    def _sample_time_wait(self, now: float) -> None:
        """Every `stats.timewait_interval`: count the kernel's TIME_WAIT sockets of our
        egress IPs (no worker sees them: they belong to the kernel once closed)."""
        if now < self._next["timewait"]:
            return
        self._next["timewait"] = now + self.config.stats.timewait_interval
        ips = {ip["ip"] for v in self._views() for ip in v.egress_ips}
        self.time_wait = sample_time_wait(local_ips=ips or None, max_rows=_TIMEWAIT_ROWS)

    def _update_status(self, now: float) -> None:
        """Every 5 s once ready: refresh the STATUS= line systemd shows."""
        if now < self._next["status"] or not self.ready_sent:
            return
        self._next["status"] = now + 5.0
        self.notifier.status(self._status())

    def _log_stats(self, now: float) -> None:
        """Every `stats.log_interval`: log the `stats` event (not at start: all zeros)."""
        if now < self._next["stats_log"]:
            return
        if self._next["stats_log"]:
            agg = self.aggregate()
            self.log.info(
                "stats",
                **agg["total"],
                egress_targets=agg["egress"]["targets"][:5],
                time_wait=agg["egress"]["time_wait"]["total"],
            )
        self._next["stats_log"] = now + self.config.stats.log_interval

    def _describe(self, address: ListenAddress) -> str:
        """`address` as bound: port 0 replaced by the port the kernel gave."""
        return str(ListenAddress(address.host, self.listeners[address][0].getsockname()[1]))

    def _metrics_address(self) -> str | None:
        """The metrics endpoint's bound address, if there is one."""
        if self.metrics is None:
            return None
        return describe(self.metrics.sock)

    def _status(self) -> str:
        """The one-line status for systemd."""
        open_tunnels = sum(v.gauges.get("open_tunnels", 0) for v in self._views())
        return f"{open_tunnels} open tunnels, {len(self.procs)} workers, {self.reloads} reloads"

    def _views(self) -> list[WorkerView]:
        """What every live worker reported, old generations included."""
        return [p.view for p in self.procs.values()]

    def aggregate(self) -> Aggregate:
        """The figures served by the control socket and `/metrics`, and logged as `stats`."""
        return stats.aggregate(
            self._views(),
            retired=self.retired,
            facts=SupervisorFacts(
                pid=self._pid,
                generation=self.gen,
                reloads=self.reloads,
                started=self.started,
                config=self.config.source,
                restarts=tuple(slot.failures for slot in self.slots),
                vacant=tuple(slot.index for slot in self.slots if slot.proc is None),
            ),
            time_wait=self.time_wait,
            now=time.monotonic(),
        )

    def usage_rows(self, kind: str) -> list[dict[str, Any]]:
        """`socksd stats --users` ("users") or `--ingress` ("ingress") as JSON rows."""
        totals = self.usage.totals(kind)
        if kind == "users":
            return usage.user_rows(totals)
        egress = EgressPolicy(self.config.egress.mappings)
        egress_of = {ip: egress.source(ip, family_of(ip)) or ip for ip in totals}
        return usage.ingress_rows(totals, egress_of, self.aggregate()["egress"])

    def metrics_usage(self) -> dict[str, Any] | None:
        """The per-user and per-ingress part of /metrics (None: neither is enabled)."""
        mc = self.config.metrics
        if not (mc.per_user or mc.per_ingress):
            return None
        out: dict[str, Any] = {}
        if mc.per_user:
            totals = self.usage.totals("users")
            # A stable set: the first max_users users ever reported keep their series.
            shown = [n for n in self.usage.seen_users if n in totals][: mc.max_users]
            rest = [totals[n] for n in totals.keys() - set(shown)]
            out["users"] = usage.user_rows({n: totals[n] for n in shown})
            out["users_overflow"] = usage.as_dict("", usage.summed(rest), "user")
            out["users_overflow"]["users"] = len(rest)
        if mc.per_ingress:
            out["ingress"] = self.usage_rows("ingress")
        return out

    def ask_workers(self, op: str, fields: dict[str, Any], waiter: ReloadWaiter) -> None:
        """`socksd tunnels` / `socksd kick`: ask every live worker (only the one a
        `conn` id names), answer `waiter` once they all did."""
        procs = [p for p in self.procs.values() if p.link is not None]
        conn = fields.get("conn")
        if conn is not None:
            procs = [p for p in procs if str(p.view.pid) == conn.split(":")[0]]
        self.fanout.ask(
            op, fields, [p.view.pid for p in procs], self._send_query, waiter, time.monotonic()
        )

    def _send_query(self, pid: int, body: dict[str, Any]) -> bool:
        proc = self.procs.get(pid)
        if proc is None or proc.link is None:
            return False
        self._send_link(proc, QUERY, body, ())
        return proc.link is not None

    # -- main loop ------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped and every worker is gone; return the exit status."""
        setproctitle.setproctitle(f"socksd: supervisor [{self.config.source}]")
        self.wake.install()
        settings = read_kernel_settings()
        self.log.info("kernel_settings", **settings.as_log(), **self.nofile.as_log())
        warnings = check(settings, self._bound_addresses()) + check_nofile(self.nofile, self.config)
        for event, fields in warnings:
            self.log.warning(event, **fields)
        try:
            while self.stopping is None or self.procs:
                for key, mask in self.sel.select(0.25):
                    self._dispatch(key.data, mask)
                self.reap()
                try:
                    self.tick(time.monotonic())
                except OSError as exc:  # e.g. EMFILE on a respawn's pipe: retried next tick
                    self.log.error("supervisor_tick_failed", error=str(exc))
                self.control.expire()
                if self.metrics is not None:
                    self.metrics.expire()
        finally:
            close_all(self.listeners)
            self.control.close()
            with contextlib.suppress(OSError):
                os.unlink(self._control_path)
            if self.metrics is not None:
                self.metrics.close()
        if self.fatal is not None:
            self.log.error("supervisor_failed", error=self.fatal)
            print(f"socksd: {self.fatal}", file=sys.stderr)
            return EXIT_BOOT
        self.log.info("supervisor_stopped")
        return EXIT_OK

    def _dispatch(self, handler: Any, mask: int) -> None:
        """One ready handler; an OSError in it is logged, never fatal to the supervisor."""
        try:
            if mask & selectors.EVENT_READ:
                handler.on_readable()
            if mask & selectors.EVENT_WRITE:
                handler.on_writable()
        except OSError as exc:
            self.log.error(
                "supervisor_handler_failed", handler=type(handler).__name__, error=str(exc)
            )

    def _bound_addresses(self) -> list[ListenAddress]:
        """Every listen address with the port it is bound to."""
        return [ListenAddress(a.host, s[0].getsockname()[1]) for a, s in self.listeners.items()]


def _file_signature(path: os.PathLike[str] | None) -> tuple[int, int, int] | None:
    """(mtime_ns, size, inode) of `path`; None when it is not set or not there."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
