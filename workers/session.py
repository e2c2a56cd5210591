"""One client conversation, from accept until its tunnel is handed over (or refused).

Owns: the conversation's phases and their table, which front door (codec) the first
byte picks, what each timeout does to a phase, failure replies and the closing line of
a refused request, and the one hand-over path to a relay (CONNECT, BIND) or a UDP
association.
Must not: create sockets (`workers.egress`, `workers.bind`, `workers.udp` do), pump
tunnel bytes (`workers.relay`), decide admission or policy (`workers.admission`,
`socksd.access`, `socksd.policy`), know a wire format (the codecs do), or keep time
(`workers.sweeps` watches the handshake and connect deadlines).

Phases (`_ALLOWED` is the whole truth; every change goes through `_transition()`,
which rejects a change the table does not list):

    HANDSHAKE       reading the greeting, the sub-negotiation and the request
    AUTHENTICATING  the credentials are being checked (off the loop; back-off timer)
    RESOLVING       the request's name is being resolved
    CONNECTING      the upstream connect (with its retries) is under way
    BINDING         BIND: the first reply is sent, the listener waits for the peer
    RELAYING        handed over to a relay or a UDP association: the session is done
    DRAINING        a failure reply was sent; waiting for the client to read it and close
    CLOSED          the client socket is closed

HANDSHAKE -> [AUTHENTICATING -> HANDSHAKE] -> RESOLVING -> CONNECTING -> RELAYING, or
HANDSHAKE -> BINDING -> RELAYING, or HANDSHAKE -> RELAYING (UDP ASSOCIATE); any phase
but RELAYING -> DRAINING -> CLOSED after a failure reply, or straight to CLOSED when
nothing can be sent.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from enum import Enum, auto
from typing import Any

import h11

from socksd import access, policy
from socksd.codec import (
    NEED_DATA,
    AddressType,
    AuthStatus,
    Command,
    CommandReply,
    CommandRequest,
    Event,
    Greeting,
    Method,
    MethodSelection,
    NeedData,
    ProtocolError,
    Reply,
    ServerCodec,
    UserPassAuth,
)
from socksd.config import hostport
from socksd.http import REPLY_OF_STATUS, HttpServerConnection
from socksd.revocation import IP_LOGIN, Admitted, Grant
from socksd.socks4 import Socks4ServerConnection
from socksd.socks5 import Socks5ServerConnection, choose_method
from socksd.usage import NO_USER
from workers import admission, bind, egress, udp
from workers.bind import BindWaiter
from workers.context import WorkerContext
from workers.events import Refused, errno_name, tunnel_closed
from workers.forward import Forward
from workers.limits import Claim
from workers.loop import EVENT_READ, EVENT_WRITE, Timer
from workers.pressure import TargetCounters
from workers.relay import Relay

# Largest handshake message is 513 bytes (RFC 1929); the rest of this allowance is for a
# client's first payload sent before our reply (it is relayed, never dropped).
HANDSHAKE_BUFFER = 64 * 1024
_RECV = 16 * 1024
# After a failure reply, how long we wait for the client to read it and close before we
# close ourselves (RFC 1928 section 6 allows up to 10 s).
DRAIN_TIMEOUT = 2.0
AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
_WITH_AUTH = (Method.USERNAME_PASSWORD,)
_WITHOUT_AUTH = (Method.NO_AUTH,)
# (auth.method, the client's address is a user's) -> the methods a greeting may get.
_IP_METHODS: dict[tuple[str, bool], tuple[Method, ...]] = {
    ("ip", True): (Method.NO_AUTH,),
    ("ip", False): (),
    # Credentials, when sent, are checked and win: two customers behind one NAT.
    ("ip_or_password", True): (Method.USERNAME_PASSWORD, Method.NO_AUTH),
    ("ip_or_password", False): (Method.USERNAME_PASSWORD,),
    ("ip_and_password", True): (Method.USERNAME_PASSWORD,),
    ("ip_and_password", False): (),
}
# Answers are values: built once, not per client.
_SELECTIONS: dict[int, MethodSelection] = {m: MethodSelection(m) for m in Method}
# Enum.name is a Python-level property: one dict lookup instead, per request.
_COMMAND_NAMES = {c: c.name.lower() for c in Command}

# The front doors other than SOCKS5, by the first byte their clients send (SOCKS4's
# VN); each is served when `protocols` names it. SOCKS5's codec is made with every
# session (the usual case); a first byte with no door here goes to it, which names
# the error. A door is a name and a codec (`socksd.codec.ServerCodec`).
_FRONT_DOORS: dict[int, tuple[str, Callable[[int], ServerCodec]]] = {
    4: ("socks4", Socks4ServerConnection),
    # An HTTP method's first letter (CONNECT, GET, POST, ...): the HTTP proxy.
    **{letter: ("http", HttpServerConnection) for letter in range(ord("A"), ord("Z") + 1)},
}


class Phase(Enum):
    """Where the conversation stands (the module docstring says what each means)."""

    # Identity hash (members are singletons): Enum's default hashes the name in Python,
    # and _transition() looks phases up in _ALLOWED twice per tunnel.
    __hash__ = object.__hash__

    HANDSHAKE = auto()
    AUTHENTICATING = auto()
    RESOLVING = auto()
    CONNECTING = auto()
    BINDING = auto()
    RELAYING = auto()
    DRAINING = auto()
    CLOSED = auto()


_ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.HANDSHAKE: frozenset(
        {
            Phase.AUTHENTICATING,
            Phase.RESOLVING,
            Phase.CONNECTING,
            Phase.BINDING,
            Phase.RELAYING,
            Phase.DRAINING,
            Phase.CLOSED,
        }
    ),
    Phase.AUTHENTICATING: frozenset({Phase.HANDSHAKE, Phase.DRAINING, Phase.CLOSED}),
    Phase.RESOLVING: frozenset({Phase.CONNECTING, Phase.DRAINING, Phase.CLOSED}),
    Phase.CONNECTING: frozenset({Phase.RELAYING, Phase.DRAINING, Phase.CLOSED}),
    Phase.BINDING: frozenset({Phase.RELAYING, Phase.DRAINING, Phase.CLOSED}),
    Phase.DRAINING: frozenset({Phase.CLOSED}),
    # Only if the hand-over itself crashed: the session then closes what it still has.
    Phase.RELAYING: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}

# Members used per connection, as module globals: in Python 3.11 `Phase.X` goes
# through EnumType.__getattr__'s lookup hook (~70 ns; a global is ~7 ns).
_HANDSHAKE = Phase.HANDSHAKE
_AUTHENTICATING = Phase.AUTHENTICATING
_RESOLVING = Phase.RESOLVING
_CONNECTING = Phase.CONNECTING
_BINDING = Phase.BINDING
_RELAYING = Phase.RELAYING
_DRAINING = Phase.DRAINING
_CLOSED = Phase.CLOSED
_CONNECT = Command.CONNECT
_BIND = Command.BIND
_DOMAINNAME = AddressType.DOMAINNAME
_IPV6 = AddressType.IPV6
_SUCCEEDED = Reply.SUCCEEDED
_NO_ACCEPTABLE = Method.NO_ACCEPTABLE
# Phases whose deadline (handshake, then connect) the deadline sweep watches.
_SWEPT = frozenset({_HANDSHAKE, _AUTHENTICATING, _RESOLVING, _CONNECTING})


class Session:
    """One client's conversation, driven by loop callbacks."""

    __slots__ = (
        "_ctx",
        "_loop",
        "client",
        "_codec",
        "phase",
        "_out",
        "_mask",
        "_started",
        "_log",
        "_context",
        "_peer",
        "_fd",
        "_ingress_ip",
        "_timer",
        "_candidates",
        "_connector",
        "_failure",
        "_user",
        "_eof",
        "_claim",
        "deadline",
        "_first_byte",
        "_protocol",
        "_bind",
        "_credentials_next",
        "_credential",
        "_ip_user",
    )

    def __init__(
        self, ctx: WorkerContext, client: socket.SocketType, peer: tuple[Any, ...], ingress_ip: str
    ) -> None:
        self._ctx = ctx
        loop = self._loop = ctx.loop
        self.client = client
        self._fd = client.fileno()
        self._codec: ServerCodec = Socks5ServerConnection(HANDSHAKE_BUFFER)
        self._protocol = "socks5"
        self.phase = _HANDSHAKE
        self._out = b""
        self._started = loop.now
        self._ingress_ip = ingress_ip
        self._peer = peer
        # The connection's log context, bound into a logger once: when something is
        # logged before the tunnel opens (`log`), or at the hand-over (one structlog
        # bind per tunnel instead of one per fact learned).
        self._context: dict[str, Any] = {
            "conn_id": ctx.next_conn_id(),
            "client": hostport(policy.normalize_ip(peer[0]), peer[1]),
            "ingress_ip": ingress_ip,
            "protocol": "socks5",  # the front door's name, until the first byte says another
        }
        self._log: Any = None
        self._candidates: list[tuple[str, socket.AddressFamily, tuple[Any, ...]]] = []
        self._connector: egress.Connector | None = None
        self._failure: egress.EgressFailed | None = None
        self._user: str | None = None
        # The user's password hash when it logged in: a reload that changes it revokes.
        self._credential: str | None = None
        self._ip_user: str | None = None  # the user its address is (auth.method "ip...")
        self._claim: Claim | None = None  # this tunnel's place in per-IP/per-user counts
        self._bind: BindWaiter | None = None
        self._first_byte = True  # the first byte read picks the front door
        # The greeting took the RFC 1929 fast path: the next read should be credentials.
        self._credentials_next = False
        self._eof = False  # FIN read, or early data while connecting: stop polling reads
        # Handshake and connect deadlines are watched by the worker's deadline sweep
        # (no timer per session); BIND and draining use a timer of their own.
        self._timer: Timer | None = None
        self.deadline = loop.now + ctx.config.timeouts.handshake
        ctx.handshakes.add(self)
        ctx.open.add(self)
        self._mask = loop.set_interest(self._fd, 0, EVENT_READ, self)

    @property
    def log(self) -> Any:
        """This connection's logger, bound with everything known so far."""
        if self._log is None:
            self._log = self._ctx.log.bind_mapping(self._context)
        return self._log

    def _learned(self, fields: dict[str, Any]) -> None:
        """Add to the log context (target, user, ...) of every later line."""
        self._context.update(fields)
        if self._log is not None:
            self._log = self._log.bind_mapping(fields)

    # -- loop callbacks ---------------------------------------------------------------

    def on_readable(self) -> None:
        phase = self.phase
        if phase is _BINDING:
            self._binding_readable()
            return
        if phase is _CONNECTING or phase is _RESOLVING:
            # Early payload (or EOF) while we connect: leave it in the kernel for the
            # relay, and stop watching until then (level-triggered: it would spin).
            self._eof = True
            self._update()
            return
        try:
            data = self.client.recv(_RECV)
        except BlockingIOError:
            return
        except OSError as exc:
            if phase is _DRAINING:
                self._finish()  # its one line was written when the failure was decided
            else:
                self._end_quietly(f"client_{errno_name(exc.errno)}")
            return
        if phase is _DRAINING:
            if not data:
                self._finish()
            return  # discard: the client is told already, we only wait for its FIN
        if not data:
            self._eof = True
            self._update()
        elif self._first_byte:
            self._first_byte = False
            if self._protocol == "http":  # the next request on a kept-alive connection
                self._next_request_begins()
            elif data[0] != 5 or self._ctx.socks5_off:
                if not self._pick_front_door(data[0]):
                    return
            elif not self._ctx.ip_auth:  # with "ip..." methods the answer needs a look-up
                # The usual greetings (05 01 00 without auth; 05 01 02 or 05 02 00 02
                # with) and their answer in one codec step: a SOCKS5 codec's own fast
                # paths (the first byte was 5).
                codec: Any = self._codec
                if self._ctx.authenticator is None:
                    answer = codec.accept_no_auth(data)
                else:
                    answer = codec.accept_user_pass(data)
                    self._credentials_next = answer is not None
                if answer is not None:
                    if not self._write(answer):
                        self._client_gone()
                    return
        elif self._credentials_next:
            self._credentials_next = False
            credentials = self._codec.accept_credentials(data)  # type: ignore[attr-defined]
            if credentials is not None:
                self._on_credentials(*credentials)
                return
        codec = self._codec
        try:
            if phase is _HANDSHAKE:
                event = codec.receive(data)  # receive_data + next_event in one
            else:
                codec.receive_data(data)  # AUTHENTICATING: kept until the verdict
                return
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._process(event)

    def on_writable(self) -> None:
        if not self._flush():
            self._client_gone()

    def on_crash(self, exc: BaseException) -> None:
        self.log.error("session_crashed", phase=self.phase.name.lower(), exc_info=exc)
        self._finish()

    def on_deadline(self) -> None:
        """The handshake or connect deadline passed (the deadline sweep)."""
        self._on_timeout()

    # -- the conversation -------------------------------------------------------------

    def _pick_front_door(self, first: int) -> bool:
        """The first byte names the protocol; False: refused (and ended)."""
        door = _FRONT_DOORS.get(first)
        if door is not None and door[0] in self._ctx.config.protocols:
            name, make_codec = door
            self._codec = make_codec(HANDSHAKE_BUFFER)
            self._protocol = name
            self._learned({"protocol": name})
            return True
        if first == 5 and self._ctx.socks5_off:
            self._handshake_failed("protocol_disabled", drain=False)
            return False
        return True  # anything else: the SOCKS5 codec names the error

    def _process(self, event: Event | NeedData = NEED_DATA) -> None:
        """Handle `event` (already read, if any), then every whole message buffered."""
        codec = self._codec
        while self.phase is _HANDSHAKE:
            if event is NEED_DATA:
                try:
                    event = codec.next_event()
                except ProtocolError as exc:
                    self._protocol_error(exc)
                    return
                if event is NEED_DATA:
                    return
            kind = type(event)
            if kind is Greeting:
                self._on_greeting(event)  # type: ignore[arg-type]
            elif kind is CommandRequest:
                self._on_request(event)  # type: ignore[arg-type]
            elif kind is UserPassAuth:
                self._on_auth(event)  # type: ignore[arg-type]
            else:  # ConnectionClosed
                self._end_quietly("client_closed")
            event = NEED_DATA

    def _on_greeting(self, event: Greeting) -> None:
        ctx = self._ctx
        ip_user = None
        if ctx.ip_auth:
            # Users known by their address: no password (0x00) for a whitelisted client
            # on its user's ingress IPs, as auth.method allows.
            ip_user = self._ip_user = ctx.whitelisted(self._peer[0], self._ingress_ip)
            acceptable = _IP_METHODS[ctx.config.auth.method, ip_user is not None]
        else:
            acceptable = _WITH_AUTH if ctx.authenticator else _WITHOUT_AUTH
        method = choose_method(event.methods, acceptable)
        codec: Any = self._codec
        reason = "no_acceptable_method"
        if method == _NO_ACCEPTABLE and ctx.ip_auth and ip_user is None and not acceptable:
            reason = "client_not_whitelisted"
        http = type(codec) is HttpServerConnection
        if http and reason == "client_not_whitelisted":
            answer = codec.failure(Reply.NOT_ALLOWED, reason)  # 403: no credentials help
        else:
            answer = codec.send(_SELECTIONS[method])  # HTTP: 407 for no acceptable method
        if not self._write(answer):
            self._client_gone()
            return
        if method == _NO_ACCEPTABLE:
            # RFC 1928 section 3: reply X'FF' and close.
            if http:
                if reason != "client_not_whitelisted":
                    reason = "http_proxy_auth_required"
                self._handshake_failed(reason)
                return
            self._handshake_failed(reason, offered=list(event.methods))
        elif ip_user is not None and method == Method.NO_AUTH:
            self._user = ip_user
            self._credential = IP_LOGIN
            self._learned({"user": ip_user, "login": "ip"})

    def _on_credentials(self, username: bytes, password: bytes) -> None:
        """The credentials, read whole by the codec's fast path (state SEND_AUTH_STATUS,
        nothing buffered). Verified lately and no back-off on this client: answered
        here, the phase never leaves HANDSHAKE (no AUTHENTICATING round trip, no two
        epoll_ctl). Otherwise the usual check, as if the codec had made the event.
        Measured with the codec's fast paths: 293,572 -> 235,278 instructions per
        user/password + IPv4 tunnel (bench/instructions.py, BLAKE2s keys included)."""
        ctx = self._ctx
        authenticator = ctx.authenticator
        assert authenticator is not None  # the greeting's fast path ran with auth on
        client_ip = self._peer[0]
        limits = ctx.limits
        if limits.auth_delay(client_ip, self._loop.now) or not authenticator.cached(
            username, password
        ):
            self._on_auth(UserPassAuth(username, password))
            return
        limits.auth_succeeded(client_ip)
        if not self._write(self._codec.accept_auth()):  # type: ignore[attr-defined]
            self._client_gone()
            return
        user = self._user = username.decode("utf-8", "replace")
        self._credential = ctx.config.auth.users.get(user)
        self._learned({"user": user})

    def _on_auth(self, event: UserPassAuth) -> None:
        ctx = self._ctx
        authenticator = ctx.authenticator
        assert authenticator is not None  # the codec only asks after 0x02
        self._user = event.username.decode("utf-8", "replace")
        self._transition(_AUTHENTICATING)
        delay = ctx.limits.auth_delay(self._peer[0], self._loop.now)
        if not delay and authenticator.cached(event.username, event.password):
            # Verified lately: the verdict now, with no interest change in between (two
            # epoll_ctl less: the HTTP front door's usual login, whose credentials come
            # with its request, and SOCKS5 logins that miss the codec's fast path).
            self._on_auth_verdict(True)
            return
        self._update()
        if delay:
            # Repeated failures from this IP: its next answer waits (a timer, the loop
            # keeps serving everyone else). The handshake timeout still applies.
            self._loop.call_later(delay, self._check_auth, event.username, event.password)
            return
        self._check_auth(event.username, event.password)

    def _check_auth(self, username: bytes, password: bytes) -> None:
        if self.phase is not _AUTHENTICATING:
            return  # timed out or closed while the back-off ran
        authenticator = self._ctx.authenticator
        if authenticator is None:  # a reload took passwords away during the back-off
            self._on_auth_verdict(False)
            return
        authenticator.check(username, password, self._on_auth_verdict)

    def _on_auth_verdict(self, ok: bool) -> None:
        if self.phase is not _AUTHENTICATING:
            return  # timed out or closed while scrypt ran
        ctx = self._ctx
        why = "auth_failed"
        method = ctx.config.auth.method  # the one in force now: a reload may have come
        if ok and ctx.authenticator is None:
            ok = False  # passwords are no longer a way in
        elif ok and method == "ip_and_password":
            if ctx.whitelisted(self._peer[0], self._ingress_ip) != self._user:
                ok, why = False, "client_not_whitelisted"  # a right password from elsewhere
        limits = ctx.limits
        if ok:
            limits.auth_succeeded(self._peer[0])
        else:
            limits.auth_failed(self._peer[0], self._loop.now)
        if not self._write(self._codec.send(AuthStatus(ok))):
            self._client_gone()
            return
        if not ok:
            if ctx.ledger is not None:
                # A name the config does not know gets no account (bounded memory).
                known = self._user if self._user in ctx.config.auth.users else None
                ctx.ledger.refused(why, self._ingress_ip, known)
            # RFC 1929: a non-zero status MUST be followed by closing the connection.
            self._handshake_failed(why, user=self._user)
            return
        assert self._user is not None
        self._credential = self._ctx.config.auth.users.get(self._user)
        self._learned({"user": self._user})
        self._transition(_HANDSHAKE)
        self._update()
        self._process()

    def _on_request(self, event: CommandRequest) -> None:
        ctx = self._ctx
        self._learned(
            {"target": hostport(event.host, event.port), "command": _COMMAND_NAMES[event.command]}
        )
        if self._protocol == "http" and self._codec.forwards:  # type: ignore[attr-defined]
            self._learned({"http_method": self._codec.method.decode()})  # type: ignore[attr-defined]
        try:
            if self._protocol == "socks4":
                userid = self._codec.userid  # type: ignore[attr-defined]  # SOCKS4's own
                user = admission.identify_socks4(ctx, userid, self._peer[0], self._ingress_ip)
                if user is not None:
                    self._user = user
                    if ctx.ip_auth:
                        self._credential = IP_LOGIN
                    self._learned({"user": user})
            if self._user is not None or ctx.limits.claims_needed:
                self._claim = admission.admit(ctx, self._peer[0], self._user, self._ingress_ip)
        except Refused as refused:
            self._refuse(refused)
            return
        if event.command is not _CONNECT:
            if event.command is _BIND:
                self._start_bind(event)
            else:
                self._start_udp(event)
            return
        self.deadline = self._loop.now + ctx.config.timeouts.connect
        # The read interest is the same while resolving and connecting as in the
        # handshake: no _update() for these transitions.
        if event.address_type is _DOMAINNAME:
            self._transition(_RESOLVING)
            ctx.resolver.resolve(event.host, event.port, self._on_resolved)
            return
        family = AF_INET6 if event.address_type is _IPV6 else AF_INET
        self._start_connecting([(family, (event.host, event.port))])

    # -- CONNECT ----------------------------------------------------------------------

    def _on_resolved(self, addresses: Any, failure: str | None) -> None:
        if self.phase is not _RESOLVING:
            return  # timed out or closed while the resolver ran
        if failure is not None or not addresses:
            # dns_nxdomain, dns_nodata, dns_servfail, dns_timeout, ... (workers.resolver)
            self._reply_failure(Reply.HOST_UNREACHABLE, failure or "dns_nodata")
            return
        self._start_connecting(addresses)

    def _start_connecting(self, addresses: list[tuple[socket.AddressFamily, Any]]) -> None:
        self._transition(_CONNECTING)
        addresses = self._allowed(addresses)
        if not addresses:
            return
        candidates = self._ctx.policy.order_candidates(addresses, self._ingress_ip)
        candidates.reverse()  # tried from the end: pop() is the next
        self._candidates = candidates
        if not candidates:
            # Never leave from another IP than the one the client came in on.
            self._reply_failure(Reply.HOST_UNREACHABLE, "no_egress_for_family")
            return
        self._connect_next()

    def _allowed(
        self, addresses: list[tuple[socket.AddressFamily, Any]]
    ) -> list[tuple[socket.AddressFamily, Any]]:
        """The addresses the destination rules allow; with none, the client is refused.

        Checked on what is actually connected to: a name that resolves to a denied
        address is denied with it (no DNS-rebinding detour).
        """
        ctx = self._ctx
        user_rules = admission.user_rules(ctx, self._user) if self._user is not None else ()
        allowed, denied = [], None
        for family, sockaddr in addresses:
            verdict = ctx.destinations.check(sockaddr[0], sockaddr[1], self._ingress_ip, user_rules)
            if verdict is None:
                allowed.append((family, sockaddr))
            elif denied is None:
                denied = (verdict, sockaddr)
        if not allowed and denied is not None:
            self._deny_destination(*denied)
        return allowed

    def _deny_destination(self, verdict: access.Verdict, address: tuple[Any, ...]) -> None:
        """Refuse with 0x02: counted, its own event (operators alert on it), then the
        connection's closing line."""
        self._ctx.counters.refuse("destination_denied")
        self.log.warning(
            "destination_denied", address=hostport(address[0], address[1]), rule=verdict.rule
        )
        self._reply_failure(Reply.NOT_ALLOWED, "destination_denied", rule=verdict.rule)

    def _connect_next(self) -> None:
        while self._candidates:
            source, family, target = self._candidates.pop()
            try:
                self._connector = egress.connect(
                    self._loop,
                    self._ctx.pressure,
                    source,
                    family,
                    target,
                    self,
                    self._ctx.config.egress.retry_delays,
                )
            except egress.EgressFailed as failure:
                self._note_failure(failure, source, target)
                continue
            return
        last = self._failure
        assert last is not None
        self._reply_failure(last.reply, last.reason, stage=last.stage)

    def _note_failure(self, failure: egress.EgressFailed, source: str, target: Any) -> None:
        # Per-attempt detail at debug: exhaustion and bind errors have their own
        # rate-limited events (workers/pressure.py), the tunnel its tunnel_closed line.
        self._failure = failure
        self.log.debug(
            "upstream_connect_failed",
            stage=failure.stage,
            errno=errno_name(failure.errno),
            source=source,
            address=hostport(target[0], target[1]),
        )

    def on_egress_failed(self, failure: egress.EgressFailed) -> None:
        connector, self._connector = self._connector, None
        if self.phase is not _CONNECTING or connector is None:
            return
        self._note_failure(failure, connector.source, connector.target)
        self._connect_next()

    def on_egress_connected(self, upstream: socket.SocketType, lease: TargetCounters) -> None:
        connector, self._connector = self._connector, None
        assert connector is not None
        self._relay(upstream, upstream.getsockname(), lease, EVENT_WRITE, connector.target)

    # -- BIND, UDP ASSOCIATE --------------------------------------------------------------

    def _start_bind(self, event: CommandRequest) -> None:
        """Listen for the peer; the first reply now, the second when it connects."""
        try:
            self._bind = waiter = bind.listen(self._ctx, self, self._ingress_ip, event)
        except Refused as refused:
            self._refuse(refused)
            return
        host, port = waiter.address
        self._transition(_BINDING)
        self._timer = self._loop.call_later(self._ctx.config.timeouts.bind, self._on_timeout)
        self._learned({"bind": hostport(host, port)})
        reply = self._codec.send(CommandReply(_SUCCEEDED, host, port, interim=True))
        if not self._write(reply):
            self._client_gone()

    def _binding_readable(self) -> None:
        """While BINDING: a FIN or an error ends the wait; early payload is kept (the
        codec's buffer, bounded by HANDSHAKE_BUFFER) for the relay, and reading goes
        on, so a client that leaves is noticed at once."""
        try:
            data = self.client.recv(_RECV)
        except BlockingIOError:
            return
        except OSError as exc:
            self._reply_failure(Reply.GENERAL_FAILURE, f"client_{errno_name(exc.errno)}")
            return
        if not data:
            self._reply_failure(Reply.GENERAL_FAILURE, "client_closed")
            return
        try:
            self._codec.receive_data(data)
        except ProtocolError as exc:  # more early payload than the buffer holds
            self._reply_failure(Reply.GENERAL_FAILURE, exc.reason, wire=exc.reply)

    def on_bind_accepted(self, peer: socket.SocketType, address: tuple[Any, ...]) -> None:
        self._bind = None
        verdict = self._ctx.destinations.check(
            address[0], address[1], self._ingress_ip, admission.user_rules(self._ctx, self._user)
        )
        if verdict is not None:
            peer.close()
            self._deny_destination(verdict, address)
            return
        # The final reply names the peer that connected (RFC 1928 section 4).
        named = (policy.normalize_ip(address[0]), address[1])
        self._relay(peer, named, None, 0, named)

    def _start_udp(self, event: CommandRequest) -> None:
        """Open the association's relay socket on the ingress IP and hand over. Its
        reply names the address `udp.advertise` gives for the ingress IP (1:1 NAT), if
        any, and the relay's port."""
        ctx = self._ctx
        udp_claim = ctx.limits.claim_udp(self._user, self._loop.now)
        if isinstance(udp_claim, str):
            self._reply_failure(Reply.NOT_ALLOWED, udp_claim)
            return
        try:
            relay = udp.open_relay_socket(self._ingress_ip, ctx.config.udp.port_range)
        except Refused as refused:
            udp_claim.release()
            self._refuse(refused)
            return
        host, port = relay.getsockname()[:2]
        advertised = ctx.config.udp.advertise.get(self._ingress_ip)
        field = "udp_relay"  # the reply names the relay socket itself ...
        if advertised is not None:  # ... or, behind 1:1 NAT, the public address
            self._learned({"udp_relay": hostport(host, port)})
            host, field = advertised, "udp_advertised"
        to_client, mask, claim, log = self._hand_over((host, port), field)
        admitted = self._admitted(None)
        announced = event.host if event.address_type is not _DOMAINNAME else ""
        try:
            assoc = udp.UdpAssociation(
                ctx,
                self.client,
                mask,
                relay,
                log=log,
                started=self._started,
                ingress_ip=self._ingress_ip,
                client_ip=policy.normalize_ip(self._peer[0]),
                announced=(announced, event.port),
                user_rules=admission.user_rules(ctx, self._user),
                claim=claim,
                admitted=admitted,
                udp_claim=udp_claim,
            )
        except OSError:  # e.g. the loop could not register a socket: give back its places
            udp_claim.release()
            if claim is not None:
                claim.release()
            relay.close()
            raise
        try:
            self.client.send(to_client)
        except OSError:
            assoc.close("client_gone")

    # -- hand-over --------------------------------------------------------------------------

    def _relay(
        self,
        upstream: socket.SocketType,
        bound: tuple[Any, ...],
        lease: TargetCounters | None,
        upstream_mask: int,
        target: tuple[Any, ...],
    ) -> None:
        """Hand the client and `upstream` (connected to `target`: CONNECT, or BIND's
        peer) to a Relay; an absolute-form HTTP request to its exchange."""
        codec: Any = self._codec
        to_client, mask, claim, log = self._hand_over(bound, "egress")
        log.debug("tunnel_opened")
        if type(codec) is HttpServerConnection and codec.forwards:
            # Its body, its response and what follows them are the exchange's.
            Forward(
                self._ctx,
                (self.client, self._fd, mask),
                (upstream, upstream_mask),
                *codec.take(),
                to_client,
                log,
                self._started,
                lease,
                claim,
                self._admitted(target),
                self._keep_alive,
            )
            return
        Relay(
            self._ctx,
            self.client,
            self._fd,
            upstream,
            to_client,
            codec.trailing_data,
            log,
            self._started,
            lease,
            claim,
            mask,
            upstream_mask,
            self._admitted(target),
        )

    def _keep_alive(self, parser: h11.Connection | None, ahead: bytes) -> None:
        """The exchange ended and the client's connection stays: a session for its next
        request (`parser` / `ahead`: what the exchange kept of the connection). Its
        conn_id is the request's; `request` counts them on the connection. It waits
        `timeouts.http_keepalive` for the request to begin (then the handshake timeout
        runs), and takes one the client sent already at once (pipelining)."""
        ctx = self._ctx
        nxt = Session(ctx, self.client, self._peer, self._ingress_ip)
        nxt._codec = codec = HttpServerConnection(HANDSHAKE_BUFFER, parser, ahead)
        nxt._protocol = "http"
        nxt._learned({"protocol": "http", "request": self._context.get("request", 1) + 1})
        if codec.buffered:
            nxt._first_byte = False
            nxt._next_request_begins()
            nxt._process()
        else:
            # No _process() here: it would make the codec's h11 parser, and the next
            # request would miss the fast path (~130 us a kept-alive request).
            nxt.deadline = nxt._loop.now + ctx.config.timeouts.http_keepalive

    def _next_request_begins(self) -> None:
        """Its first byte came: the head's deadline, and its duration, start now (the
        idle wait before is no part of the request)."""
        self._started = now = self._loop.now
        self.deadline = now + self._ctx.config.timeouts.handshake

    @property
    def between_requests(self) -> bool:
        """A kept-alive HTTP connection waiting for its next request to begin."""
        return self._first_byte and self._protocol == "http"

    def _admitted(self, target: tuple[Any, ...] | None) -> Admitted:
        """What the new owner keeps for a reload's re-check (`revocation.handed_over`)."""
        return (
            self._protocol,
            self._peer[0],
            self._ingress_ip,
            self._user,
            self._credential,
            target,
        )

    def granted(self) -> Grant:
        """What this connection was admitted on so far (a reload re-checks it): where it
        connects, if a connect is under way."""
        chosen = None if self._connector is None else self._connector.target
        logging_in = self.logging_in
        return Grant(
            # "": no byte read, no door yet (but a kept-alive HTTP connection has one)
            "" if self._first_byte and self._protocol != "http" else self._protocol,
            policy.normalize_ip(self._peer[0]),
            self._ingress_ip,
            None if logging_in else self._user,
            self._credential,
            None if chosen is None else (chosen[0], chosen[1]),
            logging_in=logging_in,
        )

    @property
    def logging_in(self) -> bool:
        """Before its request with no verified login (a user named in credentials
        under check is a claim, not a user)."""
        return self.phase in (_HANDSHAKE, _AUTHENTICATING) and self._credential is None

    @property
    def method_chosen(self) -> bool:
        """A SOCKS5 greeting (or an HTTP request, its own greeting) chose a method and
        the login is not done: a reload that changes auth.method leaves it with a method
        no longer offered."""
        return self._protocol in ("socks5", "http") and not self._first_byte and self.logging_in

    def refilter(self) -> None:
        """A reload's destination rules, on the addresses still to be tried."""
        if self._candidates:
            ctx = self._ctx
            rules = admission.user_rules(ctx, self._user) if self._user is not None else ()
            check = ctx.destinations.check
            self._candidates = [
                c
                for c in self._candidates
                if check(c[2][0], c[2][1], self._ingress_ip, rules) is None
            ]

    def revoke(self, by: str) -> None:
        """A reload's new config refuses this connection: a request under way is
        answered 0x02 (not allowed by ruleset), a handshake is closed; `by` says why."""
        if self.phase in (_RESOLVING, _CONNECTING, _BINDING):
            self._reply_failure(Reply.NOT_ALLOWED, "revoked", revoked_by=by)
        elif self.phase in (_HANDSHAKE, _AUTHENTICATING):
            self._handshake_failed("revoked", drain=False, revoked_by=by)

    def _hand_over(
        self, bound: tuple[Any, ...], field: str
    ) -> tuple[bytes, int, Claim | None, Any]:
        """The one way out of the handshake with a tunnel: the success reply naming
        `bound` (BND.ADDR:BND.PORT, also logged as `field`), counted; then what the new
        owner takes over: the bytes owed to the client, the client's loop registration,
        the tunnel's claim and its bound logger. The session is done after this."""
        ctx = self._ctx
        self._cancel_timer()
        self._transition(_RELAYING)
        reply = self._codec.send_success(bound[0], bound[1])
        if reply and self._protocol == "http":
            self._context["http_status"] = 200  # CONNECT (a forwarded request: the origin's)
        counters = ctx.counters
        counters.replied(_SUCCEEDED)
        counters.tunnels_opened += 1
        ctx.open.discard(self)
        context = self._context
        context[field] = hostport(bound[0], bound[1])
        mask, self._mask = self._mask, 0
        claim, self._claim = self._claim, None
        return self._out + reply, mask, claim, ctx.log.bind_mapping(context)

    # -- endings ------------------------------------------------------------------------

    def _on_timeout(self) -> None:
        if self.phase in (_HANDSHAKE, _AUTHENTICATING):
            codec = self._codec
            if type(codec) is HttpServerConnection and not self.between_requests:
                # RFC 9110 section 15.5.9: the head did not come whole in time.
                self._handshake_failed("handshake_timeout", drain=self._write(codec.timed_out()))
                return
            self._handshake_failed("handshake_timeout", drain=False)
        elif self.phase in (_RESOLVING, _CONNECTING):
            self._reply_failure(Reply.TTL_EXPIRED, "connect_timeout")
        elif self.phase is _BINDING:
            self._reply_failure(Reply.TTL_EXPIRED, "bind_timeout")
        elif self.phase is _DRAINING:
            self._finish()

    def _refuse(self, refused: Refused) -> None:
        self._reply_failure(refused.reply, refused.reason, **refused.fields)

    def _reply_failure(
        self, reply: Reply, reason: str, wire: bytes | None = None, **fields: Any
    ) -> None:
        """Answer the request with a failure code, log the tunnel's line, then drain.

        `wire`: the bytes to send instead of encoding `reply` (the codec's own answer
        after it failed)."""
        self._stop_waiting()
        codec = self._codec
        if type(codec) is HttpServerConnection:
            if wire is None:
                wire = codec.failure(reply, reason)  # the status says more than the code
            fields["http_status"] = codec.status
        delivered = self._write(codec.send(CommandReply(reply)) if wire is None else wire)
        ctx = self._ctx
        ctx.counters.replied(reply)
        if ctx.ledger is not None:
            user = NO_USER if self._user is None else self._user
            ctx.ledger.refused(reason, self._ingress_ip, user)
        tunnel_closed(
            self.log,
            reason,
            self._started,
            self._loop.now,
            reply=int(reply),
            **{k: v for k, v in fields.items() if v is not None},
        )
        if delivered:
            self._drain()
        else:
            self._finish()

    def _protocol_error(self, exc: ProtocolError) -> None:
        delivered = bool(exc.reply) and self._write(exc.reply)
        self._handshake_failed(exc.reason, drain=delivered)

    def _handshake_failed(self, reason: str, drain: bool = True, **fields: Any) -> None:
        codec = self._codec
        if type(codec) is not HttpServerConnection:
            self._ctx.counters.handshake_failed(reason)
            self.log.info(
                "handshake_failed", reason=reason, duration_ms=self._elapsed_ms(), **fields
            )
        elif self.between_requests:
            # A kept-alive connection that ends (closed, idle, a stopping worker) before
            # its next request: its requests had their lines, this is no request.
            self.log.debug("keepalive_closed", reason=reason)
            drain = False
        else:
            # HTTP: every request gets one tunnel_closed line with its status, answered
            # or refused (an access log), the line a SOCKS refusal gets past its request.
            self._ctx.counters.handshake_failed(reason)
            status = codec.status
            tunnel_closed(
                self.log,
                reason,
                self._started,
                self._loop.now,
                reply=REPLY_OF_STATUS.get(status, Reply.GENERAL_FAILURE),
                http_status=status,
                **fields,
            )
        if drain:
            self._drain()
        else:
            self._finish()

    def _end_quietly(self, reason: str) -> None:
        """The client went away during the handshake."""
        self._handshake_failed(reason, drain=False)

    def _client_gone(self) -> None:
        """A write to the client failed (reset, closed)."""
        if self.phase is _DRAINING:
            self._finish()  # its line was logged when the failure reply was decided
        else:
            self._end_quietly("client_gone")

    def _drain(self) -> None:
        """Let the client read our last reply before we close (no RST over it)."""
        if self.phase is _CLOSED:
            return
        self._transition(_DRAINING)
        self._cancel_timer()
        self._timer = self._loop.call_later(DRAIN_TIMEOUT, self._on_timeout)
        if not self._out:
            self._shutdown_write()
        self._update()

    def _shutdown_write(self) -> bool:
        """FIN to the client; False (and the session finished) if it is gone."""
        try:
            self.client.shutdown(socket.SHUT_WR)
        except OSError:
            self._finish()
            return False
        return True

    def close(self, reason: str, abortive: bool = False) -> None:
        """Close now (worker shutdown)."""
        if self.phase is not _DRAINING:
            self._handshake_failed(reason, drain=False)
        self._finish()

    def _finish(self) -> None:
        if self.phase is _CLOSED:
            return
        self._transition(_CLOSED)
        self._cancel_timer()
        self._stop_waiting()
        if self._mask:
            self._loop.forget(self._fd)  # closed on the next line
            self._mask = 0
        self.client.close()
        self._ctx.open.discard(self)
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    def _stop_waiting(self) -> None:
        """Cancel the connect or the BIND listener under way, if any."""
        if self._connector is not None:
            self._connector.cancel()
            self._connector = None
        if self._bind is not None:
            self._bind.cancel()
            self._bind = None

    # -- plumbing -------------------------------------------------------------------------

    def _transition(self, phase: Phase) -> None:
        if phase not in _ALLOWED[self.phase]:
            raise RuntimeError(f"session: illegal transition {self.phase.name} -> {phase.name}")
        self.phase = phase
        if phase not in _SWEPT:
            self._ctx.handshakes.discard(self)  # past its handshake and connect deadlines

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _elapsed_ms(self) -> float:
        return round((self._loop.now - self._started) * 1000, 1)

    def _write(self, data: bytes) -> bool:
        """Send, queueing what the socket does not take; False when the client is gone
        (the caller ends us)."""
        if not data:
            return True  # an answer with no bytes (HTTP's method selection): no syscall
        if not self._out and self.phase is not _DRAINING:
            # The usual case (a 2- or 10-byte answer into an empty socket buffer): sent
            # whole, nothing queued, so the registered interest stays as it is.
            try:
                sent = self.client.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                return False
            if sent == len(data):
                return True
            data = data[sent:]
        self._out += data
        return self._flush()

    def _flush(self) -> bool:
        """Send what is queued; False on a write error (nothing else is done then)."""
        if self._out:
            try:
                sent = self.client.send(self._out)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._out = b""
                return False
            self._out = self._out[sent:]
            if not self._out and self.phase is _DRAINING and not self._shutdown_write():
                return True  # the shutdown failed and finished the session
        self._update()
        return True

    def _update(self) -> None:
        if self.phase in (_CLOSED, _RELAYING):
            return
        want = EVENT_WRITE if self._out else 0
        # Not while AUTHENTICATING: scrypt may take ~40 ms and a client must not be able
        # to overflow the handshake buffer with early payload meanwhile. While resolving
        # and connecting the read interest stays (the relay takes it over: two fewer
        # epoll_ctl per tunnel) until the client actually sends something.
        if self.phase is _DRAINING or (
            self.phase in (_HANDSHAKE, _RESOLVING, _CONNECTING, _BINDING) and not self._eof
        ):
            want |= EVENT_READ
        self._mask = self._loop.set_interest(self._fd, self._mask, want, self)
