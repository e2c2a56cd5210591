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


def identify_socks4(ctx: WorkerContext, userid: bytes) -> str | None:
    """The user a SOCKS4 USERID names, or None with authentication off.

    SOCKS4 has no password: with auth on, the USERID must name a configured user
    (identification, not authentication; see the README).

    Raises:
        Refused: 0x02 (SOCKS4: 91), the USERID names no configured user.
    """
    name = userid.decode("utf-8", "replace")
    if ctx.authenticator is None:
        return None
    if name not in ctx.config.auth.users:
        raise Refused(Reply.NOT_ALLOWED, "socks4_unknown_user", user=name)
    return name
