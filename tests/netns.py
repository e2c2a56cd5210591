"""Throw-away Linux network namespaces for tests.

Owns: creating a named namespace (`ip netns add`), its sysctls and addresses, sockets
created inside it from this process, processes run inside it, and deleting all of it.
Must not: touch the host namespace's settings, or leave a namespace, socket or process
behind once `close()` has run (also at interpreter exit, as a last resort).

Sockets: network namespaces are per *thread* for `setns(2)` (CLONE_NEWNET), and a socket
belongs for its whole life to the namespace it was created in. So one helper thread per
`NetNS` enters the namespace once and creates sockets on request; the sockets it hands
back can be used from any thread. Python 3.11 has no `os.setns`, hence ctypes.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import functools
import itertools
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
_CALL_TIMEOUT = 10.0  # seconds; a request to the helper thread is a syscall or two
_KILL_TIMEOUT = 5.0

T = TypeVar("T")

_counter = itertools.count(1)
_live: weakref.WeakSet[NetNS] = weakref.WeakSet()
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def _setns(path: str) -> None:
    """Move the *calling thread* into the network namespace bound at `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args], check=True, capture_output=True, text=True, timeout=_CALL_TIMEOUT
    )


def _sysctl_path(key: str) -> str:
    # "net.ipv4.tcp_tw_reuse" -> /proc/sys/net/ipv4/tcp_tw_reuse; "/" form passes through.
    path = key if "/" in key else key.replace(".", "/")
    if not path.startswith("net/"):
        # Only net.* can be per network namespace (global net.* entries exist only in the
        # initial one); any other key written from the helper thread would change the host.
        raise ValueError(f"not a network-namespace sysctl: {key!r}")
    return "/proc/sys/" + path


class _NsThread:
    """One thread living inside the namespace, serving requests from a queue."""

    def __init__(self, name: str) -> None:
        self._requests: queue.SimpleQueue[
            tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None
        ] = queue.SimpleQueue()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._serve, args=(name, ready), name=f"netns-{name}", daemon=True
        )
        self._thread.start()
        ready.result(timeout=_CALL_TIMEOUT)  # re-raises a failed setns()

    def _serve(self, name: str, ready: concurrent.futures.Future[None]) -> None:
        try:
            _setns(os.path.join(NETNS_RUN_DIR, name))
        except BaseException as exc:  # noqa: BLE001 - handed to the creator, which raises it
            ready.set_exception(exc)
            return
        ready.set_result(None)
        while (request := self._requests.get()) is not None:
            fn, future = request
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                future.set_exception(exc)

    def call(self, fn: Callable[[], T]) -> T:
        if not self._thread.is_alive():
            raise RuntimeError("namespace helper thread is not running")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._requests.put((fn, future))
        return future.result(timeout=_CALL_TIMEOUT)

    def stop(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=_CALL_TIMEOUT)


class NetNS:
    """A named network namespace with `lo` up, deleted by `close()`.

    Example:
        with NetNS() as ns:
            ns.sysctl("net.ipv4.ip_local_port_range", "50000 50001")
            listener = ns.socket()
            listener.bind(("127.0.0.33", 9003))
    """

    def __init__(self, prefix: str = "socksd") -> None:
        self.name = f"{prefix}-{os.getpid()}-{next(_counter)}"
        self._closed = False
        self._procs: list[subprocess.Popen[Any]] = []
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._thread: _NsThread | None = None
        _ip("netns", "add", self.name)
        _live.add(self)
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
            self._thread = _NsThread(self.name)
        except BaseException:
            self.close()
            raise

    # -- settings ---------------------------------------------------------------------

    def sysctl(self, key: str, value: str | int) -> None:
        """Write a sysctl inside the namespace, e.g. `("net.ipv4.tcp_tw_reuse", 1)`.

        Raises:
            ValueError: `key` is not under `net.` (only those are per namespace).
            FileNotFoundError: the kernel has no such sysctl, or not per namespace.
        """
        path = _sysctl_path(key)

        def write() -> None:
            # /proc/sys/net resolves against the *calling thread's* namespace.
            with open(path, "w") as f:
                f.write(f"{value}\n")

        self._call(write)

    def read_sysctl(self, key: str) -> str:
        """Read a sysctl inside the namespace, whitespace-stripped.

        Raises:
            ValueError: `key` is not under `net.` (only those are per namespace).
            FileNotFoundError: the kernel has no such sysctl, or not per namespace.
        """
        path = _sysctl_path(key)

        def read() -> str:
            with open(path) as f:
                return f.read().strip()

        return self._call(read)

    def add_address(self, cidr: str) -> None:
        """Add an address to the namespace's `lo` (idempotent) and wait until it is usable.

        IPv6 addresses get `nodad`; even so the kernel installs their local route from a
        workqueue (addrconf_dad_work) *after* `ip addr` returns, and until then a
        connect() to the address fails ENETUNREACH, so this waits for that route.

        Raises:
            TimeoutError: the IPv6 local route did not appear within 10 s.
        """
        if ":" not in cidr:
            _ip("-n", self.name, "addr", "replace", cidr, "dev", "lo")
            return  # IPv4: the local route is added synchronously
        _ip("-n", self.name, "addr", "replace", cidr, "dev", "lo", "nodad")
        addr = cidr.partition("/")[0]
        deadline = time.monotonic() + _CALL_TIMEOUT
        for _ in range(1000):  # each round is two `ip` runs (~5 ms) and a 5 ms sleep
            route = _ip("-n", self.name, "-6", "route", "show", "table", "local", addr).stdout
            state = _ip("-n", self.name, "-6", "addr", "show", "dev", "lo", "to", addr).stdout
            if route.strip() and "tentative" not in state:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        raise TimeoutError(f"{cidr} on lo in {self.name} never became usable")

    # -- sockets and processes --------------------------------------------------------

    def socket(
        self,
        family: socket.AddressFamily | int = socket.AF_INET,
        type: socket.SocketKind | int = socket.SOCK_STREAM,  # mirrors socket.socket()
        proto: int = 0,
    ) -> socket.socket:
        """Create a socket inside the namespace; it is closed by `close()` at the latest."""
        sock = self._call(lambda: socket.socket(family, type, proto))
        self._sockets.add(sock)
        return sock

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside the namespace in a new session (its own process group)."""
        if self._closed:
            raise RuntimeError(f"netns {self.name} is closed")
        if kwargs.pop("start_new_session", True) is not True:
            raise ValueError("NetNS.popen always uses start_new_session=True")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv], start_new_session=True, **kwargs
        )
        self._procs.append(proc)
        return proc

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run `argv` inside the namespace and wait; `check=True` unless told otherwise.

        Takes `input`, `timeout`, `check` and `capture_output` like `subprocess.run`; on
        timeout the whole process group is killed, not only the direct child.
        """
        check = kwargs.pop("check", True)
        timeout = kwargs.pop("timeout", None)
        stdin_data = kwargs.pop("input", None)
        if kwargs.pop("capture_output", False):
            kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
        if stdin_data is not None:
            kwargs["stdin"] = subprocess.PIPE
        proc = self.popen(argv, **kwargs)
        try:
            out, err = proc.communicate(stdin_data, timeout=timeout)
        except BaseException:
            _kill_group(proc)
            raise
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Kill processes, close sockets, stop the helper thread, delete the namespace.

        Idempotent. Every step is attempted; the first failure is raised at the end.
        """
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        for proc in self._procs:
            try:
                _kill_group(proc)
            except Exception as exc:  # noqa: BLE001 - collected, raised below
                errors.append(exc)
        for sock in list(self._sockets):
            sock.close()
        if self._thread is not None:
            self._thread.stop()
        try:
            _ip("netns", "del", self.name)
        except subprocess.CalledProcessError as exc:
            if os.path.exists(os.path.join(NETNS_RUN_DIR, self.name)):
                errors.append(exc)
        _live.discard(self)
        if errors:
            raise errors[0]

    def __enter__(self) -> NetNS:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NetNS({self.name!r}{', closed' if self._closed else ''})"

    def _call(self, fn: Callable[[], T]) -> T:
        if self._closed or self._thread is None:
            raise RuntimeError(f"netns {self.name} is closed")
        return self._thread.call(fn)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL the process group led by `proc` (start_new_session) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=_KILL_TIMEOUT)  # reaps, and closes any pipes


@functools.cache
def netns_available() -> tuple[bool, str]:
    """Tell whether network namespaces can be made here, and if not, why.

    Returns:
        (ok, reason): ok is True when we are root, `ip` exists, and a probe namespace
        could be added, entered by a thread and deleted.
    """
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    if shutil.which("ip") is None:
        return False, "`ip` (iproute2) is not installed"
    try:
        with NetNS("socksd-probe") as probe:
            probe.socket().close()
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        return False, f"cannot create a network namespace: {detail!s}".strip()
    return True, "network namespaces available"


@atexit.register
def _close_leftovers() -> None:
    # Last resort for a NetNS nobody closed (a crashed test run): never leave it behind.
    for ns in list(_live):
        try:
            ns.close()
        except Exception as exc:  # noqa: BLE001 - interpreter exit: report, go on
            print(f"tests.netns: could not clean up {ns.name}: {exc!r}", file=sys.stderr)
