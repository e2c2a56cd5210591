"""sd_notify: exact datagrams on a receiver socket of our own, and no-ops when unset.

These unit tests use local AF_UNIX datagram sockets (no network, no fork): the
receiver is the only faithful oracle for what the service manager would read.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from socksd import notify
from socksd.notify import Notifier, unset_environment


def _receiver(bind_to: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(bind_to)
    sock.settimeout(2.0)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A receiver bound to a filesystem path: (address for Notifier, receiver)."""
    path = str(tmp_path / "n.sock")
    assert len(path) < 108, "sun_path limit"
    sock = _receiver(path)
    try:
        yield path, sock
    finally:
        sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    """A receiver bound to an abstract name: ("@name", receiver)."""
    name = f"socksd-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock = _receiver("\0" + name)
    try:
        yield "@" + name, sock
    finally:
        sock.close()


def _nothing_queued(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    return False


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda n: n.ready(), b"READY=1"),
        (lambda n: n.ready("serving 2 workers"), b"READY=1\nSTATUS=serving 2 workers"),
        (lambda n: n.stopping(), b"STOPPING=1"),
        (lambda n: n.status("draining 12 tunnels"), b"STATUS=draining 12 tunnels"),
        (lambda n: n.mainpid(4711), b"MAINPID=4711"),
        (
            lambda n: n.notify(STATUS="x", ERRNO=0, BUSERROR="a=b"),
            b"STATUS=x\nERRNO=0\nBUSERROR=a=b",
        ),
        (lambda n: n.notify(READY=True), b"READY=1"),
        (lambda n: n.status("µs ok"), "STATUS=µs ok".encode()),
    ],
)
def test_exact_message_on_path_socket(path_socket, call, expected):
    address, rx = path_socket
    assert call(Notifier(address)) is True
    assert rx.recv(4096) == expected


def test_exact_message_on_abstract_socket(abstract_socket):
    address, rx = abstract_socket
    n = Notifier(address)
    assert n.enabled and n.address == address
    assert n.ready("up") is True
    assert n.stopping() is True
    assert rx.recv(4096) == b"READY=1\nSTATUS=up"
    assert rx.recv(4096) == b"STOPPING=1"


def test_reloading_carries_monotonic_usec(abstract_socket):
    address, rx = abstract_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier(address).reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = rx.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after


def test_default_address_is_the_environment(path_socket, monkeypatch):
    address, rx = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert Notifier().address == address
    assert Notifier().ready() is True
    assert rx.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", [None, ""])
def test_unset_or_empty_is_a_noop(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    n = Notifier()
    assert not n.enabled
    assert n.ready() is False
    assert n.reloading() is False
    assert n.stopping() is False
    assert n.status("x") is False
    assert n.mainpid(1) is False
    assert n.notify(READY=1) is False


@pytest.mark.parametrize("address", ["relative/n.sock", "@", "vsock:2:1234"])
def test_unsupported_address_is_a_noop(address):
    n = Notifier(address)
    assert not n.enabled
    assert n.ready() is False


def test_send_errors_are_returned_not_raised(tmp_path):
    assert Notifier(str(tmp_path / "nobody-listens")).ready() is False  # ENOENT
    assert Notifier("/" + "x" * 200).ready() is False  # longer than sun_path
    assert Notifier("/tmp/nul\0byte").ready() is False  # ValueError from the socket module
    assert Notifier(str(tmp_path / "x")).status("\udcff") is False  # not encodable


@pytest.mark.parametrize(
    "fields",
    [
        {"STATUS": "two\nlines"},  # would forge a second assignment
        {"READY": 1, "STATUS": "READY=0\nSTOPPING=1"},
        {"": "x"},
        {"A=B": "x"},
        {},
    ],
)
def test_malformed_fields_send_nothing(path_socket, fields):
    address, rx = path_socket
    assert Notifier(address).notify(**fields) is False
    assert _nothing_queued(rx)


def test_full_receiver_queue_returns_false_without_blocking(path_socket):
    address, _rx = path_socket  # never read: the queue fills (net.unix.max_dgram_qlen)
    n = Notifier(address)
    results: list[bool] = []

    def flood() -> None:
        for _ in range(10_000):
            results.append(n.status("x" * 1024))
            if not results[-1]:
                return

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    sender.join(timeout=10.0)
    assert not sender.is_alive(), "notify() blocked on a full receiver"
    assert results[0] is True
    assert results[-1] is False


def test_unset_environment_keeps_existing_notifier(path_socket, monkeypatch):
    address, rx = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    supervisor = Notifier()
    unset_environment()
    assert "NOTIFY_SOCKET" not in os.environ
    assert not Notifier().enabled, "what a worker would build after the fork"
    unset_environment()  # idempotent
    assert supervisor.ready() is True
    assert rx.recv(4096) == b"READY=1"
    assert notify.ENV_VAR == "NOTIFY_SOCKET"
