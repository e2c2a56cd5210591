from __future__ import annotations

import http.server
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import Socksd, TargetServer, echo

HTTP_BODY = b"hello through socksd\n" * 50


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Socksd]]:
    """Start socksd processes with a given config; all are stopped at teardown."""
    started: list[Socksd] = []

    def start(config_text: str, *args: str, **kw: Any) -> Socksd:
        proc = Socksd(config_text, tmp_path, args, **kw)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        assert proc.stop() == 0, "socksd did not exit cleanly on SIGTERM"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Socksd]:
    """A no-auth socksd on 127.0.0.1 with short timeouts, shared by a module."""
    proc = Socksd(
        'listen = ["127.0.0.1:0"]\nworkers = 1\n'
        "[timeouts]\nhandshake = 1.0\nconnect = 2.0\nidle = 30.0\n",
        tmp_path_factory.mktemp("proxy"),
    )
    yield proc
    assert proc.stop() == 0


@pytest.fixture
def echo_target() -> Iterator[TargetServer]:
    server = TargetServer(echo)
    yield server
    server.close()


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", str(len(HTTP_BODY)))
        self.end_headers()
        self.wfile.write(HTTP_BODY)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_target() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def curl_path() -> str | None:
    return shutil.which("curl")
