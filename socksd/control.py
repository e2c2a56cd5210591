"""The supervisor's local endpoints: the control socket and the optional metrics port.

Owns: a non-blocking one-request-one-response server used for both (a unix socket
answering `stats`, `users`, `ingress`, `reload`, `tunnels` and `kick`, and a minimal
HTTP GET /metrics), the client of the `socksd` commands that ask it, and the human
table of `socksd stats`. A response may come later
than its request (`LATER`: a reload answers once every worker applied it).
Must not: compute figures; it is handed a function that returns the aggregate.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import stat
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from socksd.config import ListenAddress
from socksd.errors import ListenError, SocksdError
from socksd.handlers import ReadOnlyHandler

MAX_REQUEST = 8192


class _Later:
    """A responder's answer meaning: the response comes later, through `answer`."""


LATER = _Later()
Answer = Callable[[bytes], None]
# (request so far, how to answer later) -> the response, None (need more) or LATER.
Responder = Callable[[bytes, Answer], "bytes | None | _Later"]


CONN_TIMEOUT = 5.0  # a request/response must be done within this, or it is dropped
LATER_TIMEOUT = 60.0  # ... or this, when the response comes later (a reload, a query)
MAX_CONNS = 32  # concurrent connections per endpoint; more wait in the backlog
_PAUSE = 1.0  # out of fds: stop accepting this long


class _Conn:
    """One accepted connection: read a request, write the response, close."""

    __slots__ = ("sock", "_endpoint", "_respond", "_inbuf", "_out", "deadline", "_waiting")

    def __init__(self, sock: socket.socket, endpoint: Endpoint, respond: Responder):
        self.sock = sock
        self._endpoint = endpoint
        self._respond = respond
        self._inbuf = b""
        self._out = b""
        self._waiting = False
        self.deadline = time.monotonic() + CONN_TIMEOUT
        sock.setblocking(False)
        endpoint.sel.register(sock, selectors.EVENT_READ, self)

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        if self._waiting:
            return  # nothing more is asked on a connection whose answer is pending
        self._inbuf += data
        response = self._respond(self._inbuf, self.answer)
        if response is None and len(self._inbuf) < MAX_REQUEST:
            return
        if response is LATER:
            # Still polled for reads: a client that gives up is noticed (EOF).
            self.deadline = time.monotonic() + LATER_TIMEOUT
            self._waiting = True
            return
        self.answer(response if isinstance(response, bytes) else b"")

    def answer(self, response: bytes) -> None:
        """Send `response` (empty: close without one)."""
        if self.sock.fileno() < 0:
            return  # expired or closed meanwhile
        self._waiting = False
        if not response:
            self.close()
            return
        self._out = response
        self._endpoint.sel.modify(self.sock, selectors.EVENT_WRITE, self)
        self.on_writable()

    def on_writable(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except BlockingIOError:
            return
        except OSError:
            sent = len(self._out)  # the client is gone: nothing left to do
        self._out = self._out[sent:]
        if not self._out:
            self.close()

    def close(self) -> None:
        self._endpoint.forget(self)
        self._endpoint.sel.unregister(self.sock)
        self.sock.close()


class Endpoint(ReadOnlyHandler):
    """A listening socket whose connections each get one response, bounded in number
    and time, so a slow or hostile local client cannot wedge the supervisor."""

    def __init__(self, sock: socket.socket, sel: selectors.BaseSelector, respond: Responder):
        self.sock = sock
        self.sel = sel
        self._respond = respond
        self._conns: set[_Conn] = set()
        self._paused_until = 0.0
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, self)

    def on_readable(self) -> None:
        while len(self._conns) < MAX_CONNS:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            except OSError:
                # Out of fds (or a transient accept error): stop watching the listener
                # for a moment instead of spinning on it.
                self._pause()
                return
            self._conns.add(_Conn(conn, self, self._respond))
        self._pause()  # at the cap: the backlog waits until expire() resumes us

    def _pause(self) -> None:
        if not self._paused_until:
            self.sel.unregister(self.sock)
        self._paused_until = time.monotonic() + _PAUSE

    def forget(self, conn: _Conn) -> None:
        self._conns.discard(conn)

    def expire(self) -> None:
        """Drop connections past their deadline; resume accepting after a pause."""
        now = time.monotonic()
        for conn in [c for c in self._conns if c.deadline < now]:
            conn.close()
        if self._paused_until and now >= self._paused_until and len(self._conns) < MAX_CONNS:
            self._paused_until = 0.0
            self.sel.register(self.sock, selectors.EVENT_READ, self)

    def close_all(self) -> None:
        """Close every fd of this endpoint without touching the selector (in a child)."""
        for conn in self._conns:
            conn.sock.close()
        self.sock.close()

    def close(self) -> None:
        for conn in list(self._conns):
            conn.close()
        if not self._paused_until:
            self.sel.unregister(self.sock)
        self.sock.close()


def open_control_socket(path: str) -> socket.socket:
    """Bind the unix control socket (mode 0600), replacing a stale one.

    Raises:
        ListenError: another live process answers on `path`, or it cannot be bound.
    """
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise ListenError(f"control socket {path!r} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens
        else:
            raise ListenError(f"control socket {path!r} is in use by another socksd")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot bind control socket {path!r}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def open_metrics_socket(address: ListenAddress) -> socket.socket:
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address.host, address.port))
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on metrics.listen {address}: {exc.strerror}") from None
    sock.listen(64)
    return sock


def control_responder(
    aggregate: Callable[[], Mapping[str, Any]],
    reload: Callable[[Callable[[dict[str, Any]], None]], None],
    usage: Callable[[str], list[dict[str, Any]]],
    ask: Callable[[str, dict[str, Any], Callable[[dict[str, Any]], None]], None],
) -> Responder:
    """`stats`: the aggregate now; `users` / `ingress`: the per-customer rows now;
    `reload`: the reload's outcome once it is done; `tunnels QUERY` / `kick QUERY`
    (QUERY: a JSON object of `user`, `ingress`, `conn`): the workers' answers."""

    def respond(request: bytes, answer: Answer) -> bytes | None | _Later:
        if b"\n" not in request:
            return None
        line = request.split(b"\n", 1)[0].strip()
        command, _, arg = line.partition(b" ")
        if command == b"stats":
            return orjson.dumps(aggregate(), option=orjson.OPT_NON_STR_KEYS) + b"\n"
        if command in (b"users", b"ingress"):
            return orjson.dumps({"ok": True, command.decode(): usage(command.decode())}) + b"\n"
        if command == b"reload":
            reload(lambda outcome: answer(orjson.dumps(outcome) + b"\n"))
            return LATER
        if command in (b"tunnels", b"kick"):
            fields, error = _tunnel_query(arg)
            if error:
                return orjson.dumps({"ok": False, "error": error}) + b"\n"
            ask(command.decode(), fields, lambda outcome: answer(orjson.dumps(outcome) + b"\n"))
            return LATER
        text = command.decode(errors="replace")
        return orjson.dumps({"ok": False, "error": f"unknown command {text!r}"}) + b"\n"

    return respond


def _tunnel_query(arg: bytes) -> tuple[dict[str, Any], str]:
    """The filter of `tunnels` / `kick`, or why it is not one."""
    try:
        raw = orjson.loads(arg) if arg.strip() else {}
    except orjson.JSONDecodeError:
        return {}, "the query is not JSON"
    if not isinstance(raw, dict):
        return {}, "the query must be a JSON object"
    fields: dict[str, Any] = {}
    for key in ("user", "ingress", "conn"):
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            return {}, f"{key}: must be a string"
        fields[key] = value
    unknown = sorted(set(raw) - {"user", "ingress", "conn"})
    if unknown:
        return {}, f"{unknown[0]}: unknown key"
    conn = fields.get("conn", "0:0").split(":")
    if len(conn) != 2 or not all(part.isdigit() for part in conn):
        return {}, "conn: must be PID:CONN_ID, as `socksd tunnels` shows it"
    return fields, ""


def metrics_responder(render: Callable[[], str]) -> Responder:
    def respond(request: bytes, answer: Answer) -> bytes | None | _Later:
        if b"\r\n\r\n" not in request and b"\n\n" not in request:
            return None
        line = request.split(b"\n", 1)[0].split()
        if len(line) >= 2 and line[0] == b"GET" and line[1] in (b"/metrics", b"/"):
            body = render().encode()
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
        else:
            body = b"not found\n"
            head = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
        return head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body

    return respond


def query(path: str, command: str = "stats", timeout: float = 3 * CONN_TIMEOUT) -> dict[str, Any]:
    """Ask a running supervisor (the `socksd stats` client).

    Raises:
        SocksdError: nothing answers on `path`.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError as exc:
        raise SocksdError(f"no socksd answers on {path!r}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            sock.close()
    result: dict[str, Any] = orjson.loads(b"".join(chunks))
    return result


def format_table(agg: dict[str, Any]) -> str:
    """The human view of `socksd stats`."""
    sup, total = agg["supervisor"], agg["total"]
    c, g = total["counters"], total["gauges"]
    lines = [
        f"socksd pid {sup['pid']}  generation {sup['generation']}  workers "
        f"{sum(1 for w in agg['workers'] if w['alive'])}/{sup['workers_wanted']}  "
        f"up {sup['uptime_s']:.0f} s  config {sup['config']}",
        "",
        f"{'worker':>6} {'pid':>8} {'gen':>4} {'open':>7} {'opened':>10} {'closed':>10} "
        f"{'bytes up':>14} {'bytes down':>14} {'seen':>6}",
    ]
    rows = [
        *agg["workers"],
        {"slot": "total", "pid": "", "gen": "", "counters": c, "gauges": g, "last_seen_s": None},
    ]
    for w in rows:
        wc, wg = w["counters"], w["gauges"]
        seen = "" if w["last_seen_s"] is None else f"{w['last_seen_s']:.1f}s"
        lines.append(
            f"{w['slot']!s:>6} {w['pid']!s:>8} {w['gen']!s:>4} {wg.get('open_tunnels', 0):>7} "
            f"{wc.get('tunnels_opened', 0):>10} {wc.get('tunnels_closed', 0):>10} "
            f"{wc.get('bytes_up', 0):>14} {wc.get('bytes_down', 0):>14} {seen:>6}"
        )
    lines += [
        "",
        f"replies {c.get('replies', {})}  handshake failures {c.get('handshake_failures', {})}"
        f"  refused {c.get('refused', {})}",
    ]
    dns = agg.get("dns")
    if dns:
        ratio = "-" if dns["hit_ratio"] is None else f"{dns['hit_ratio']:.1%}"
        lines.append(
            f"dns lookups {dns['lookups']}  hits {dns['hits']} ({ratio})  misses "
            f"{dns['misses']}  coalesced {dns['coalesced']}  stale {dns['stale']}  "
            f"latency p50 <= {dns['latency_p50_ms']} ms p99 <= {dns['latency_p99_ms']} ms  "
            f"failures {dns['failures']}"
        )
    lines.append("")
    eg = agg["egress"]
    lines.append(f"egress (ephemeral ports P = {eg['ephemeral_ports']})")
    lines.append(
        f"{'egress ip':<40} {'open':>7} {'ok':>10} {'exhausted':>9} {'retries':>8} {'rescued':>8}"
        f" {'udp':>5}"
    )
    for ip in eg["ips"]:
        lines.append(
            f"{ip['ip']:<40} {ip['open']:>7} {ip['succeeded']:>10} "
            f"{ip['exhausted']:>9} {ip['retries']:>8} {ip['rescued']:>8} {ip.get('udp_open', 0):>5}"
        )
    tw = {(r["egress_ip"], r["target"]): r["count"] for r in eg["time_wait"]["by_pair"]}
    lines += [
        "",
        f"{'egress ip':<40} {'target':<46} {'open':>6} {'closing':>7} "
        f"{'TIME_WAIT':>9} {'pressure':>8}",
    ]
    for t in eg["targets"]:
        lines.append(
            f"{t['egress_ip']:<40} {t['target']:<46} {t['open']:>6} {t['recent_closes']:>7} "
            f"{tw.get((t['egress_ip'], t['target']), 0):>9} {t['pressure']:>8.1%}"
        )
    return "\n".join(lines)
