"""Who a connection's user is, and whether a new tunnel of theirs may open.

Owns: the per-user admission of a request: the user's ingress rule (a customer uses
only the IPs leased to them), their concurrency and rate limits (counted by
`workers.limits`), SOCKS4's USERID identification, and which destination rules are
the user's own.
Must not: reply, log the connection's line or touch sockets: it answers, and raises
`Refused` for the session to reply with.
"""

from __future__ import annotations

from socksd import access
from socksd.codec import Reply
from socksd.config import UserAccess
from workers.context import WorkerContext
from workers.events import Refused
from workers.limits import Claim

_NO_USER = UserAccess()


def user_rules(ctx: WorkerContext, user: str | None) -> tuple[access.Rule, ...]:
    """The destination rules checked before the global ones for `user` (None: none)."""
    if user is None:
        return ()
    return ctx.config.access.users.get(user, _NO_USER).destinations


def admit(ctx: WorkerContext, client_ip: str, user: str | None, ingress_ip: str) -> Claim | None:
    """The tunnel's place in the per-IP/per-user counts (None when nothing is counted).

    Only asked with a user or with limits configured.

    Raises:
        Refused: 0x02, the user may not use this ingress IP or is over a limit.
    """
    if user is not None:
        nets = ctx.config.access.users.get(user, _NO_USER).ingress
        if nets and not access.ingress_allowed(nets, ingress_ip):
            # A customer may only use the IPs leased to them.
            ctx.counters.refuse("ingress_not_allowed")
            raise Refused(Reply.NOT_ALLOWED, "ingress_not_allowed")
    if not ctx.limits.claims_needed:
        return None
    claim = ctx.limits.claim(client_ip, user, ctx.loop.now)
    if isinstance(claim, str):
        raise Refused(Reply.NOT_ALLOWED, claim)
    return claim


def identify_socks4(
    ctx: WorkerContext, userid: bytes, client_ip: str, ingress_ip: str
) -> str | None:
    """The user a SOCKS4 request is, or None with authentication off.

    SOCKS4 has no password: with auth.method "password" the USERID must name a
    configured user (identification, not authentication; see the README); with "ip" or
    "ip_or_password" the client's address must be a user's (the USERID is not read:
    alone it would stand in for a password);
    "ip_and_password" refuses SOCKS4 (it cannot give the password).

    Raises:
        Refused: 0x02 (SOCKS4: 91), no user is identified.
    """
    method = ctx.config.auth.method
    if method == "ip_and_password":
        raise Refused(Reply.NOT_ALLOWED, "socks4_without_password")
    if ctx.ip_auth:
        user = ctx.whitelisted(client_ip, ingress_ip)
        if user is None:  # a USERID alone never stands for a password
            raise Refused(Reply.NOT_ALLOWED, "client_not_whitelisted")
        return user
    name = userid.decode("utf-8", "replace")
    if ctx.authenticator is None:
        return None
    if name not in ctx.config.auth.users:
        raise Refused(Reply.NOT_ALLOWED, "socks4_unknown_user", user=name)
    return name
