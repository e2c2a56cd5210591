"""Whether a connection opened under one config is still allowed by a new one.

Owns: `Grant`, the facts a connection was admitted on (who, from where, on which
ingress IP, to where), and `revoked_by()`, the pure decision of a reload: None to keep
the connection, else the name of the rule or the change that now refuses it.
Must not: touch sockets or close anything (the worker's reload step does), or keep
state between reloads.

The checks are those a new connection meets, in the same order: the protocol is
still enabled, the client IP is still allowed (`access.clients`), authentication is
still satisfied (a user known by its address whose `clients` no longer hold the
client IP is revoked, as is one that logged in with a password the method no longer
takes; a user that no longer exists, or whose password hash changed, is
revoked; a tunnel opened without a user is revoked once `auth.method` becomes
"password"), the user may still use the ingress IP (`access.users.NAME.ingress`), and
the destination is still allowed (the user's rules, then `access.destinations`, then
the built-in denials). Limits are not re-checked: a lower limit applies to new
tunnels, and cutting live ones to fit it would pick victims at random.
"""

from __future__ import annotations

from typing import Any

from socksd.access import ClientPolicy, DestinationPolicy, ingress_allowed
from socksd.config import Config, UserAccess
from socksd.policy import normalize_ip
from socksd.whitelist import ClientUsers

_NO_USER = UserAccess()

# The `revoked_by` values that name a change rather than a rule.
USER_REMOVED = "user_removed"
PASSWORD_CHANGED = "password_changed"
AUTH_REQUIRED = "auth.method"
# A Grant's credential when its user was known by its address (no password).
IP_LOGIN = "ip"
PROTOCOL_OFF = "protocols"


class Grant:
    """What a connection was admitted on. `credential`: the user's password hash when
    it logged in (None: no password, e.g. SOCKS4's USERID); `target`: the (ip, port)
    it connects to (None: not yet chosen, or a UDP association, whose datagrams are
    checked one by one against the rules in force); `logging_in`: a handshake that has
    not reached its login yet (no user is not a reason to revoke it)."""

    __slots__ = (
        "protocol",
        "client_ip",
        "ingress_ip",
        "user",
        "credential",
        "target",
        "logging_in",
    )

    def __init__(
        self,
        protocol: str,
        client_ip: str,
        ingress_ip: str,
        user: str | None,
        credential: str | None,
        target: tuple[str, int] | None,
        logging_in: bool = False,
    ) -> None:
        self.protocol = protocol
        self.client_ip = client_ip
        self.ingress_ip = ingress_ip
        self.user = user
        self.credential = credential
        self.target = target
        self.logging_in = logging_in


# What a tunnel keeps from its hand-over, as it was there: (protocol, client IP as the
# kernel gave it, ingress IP, user, credential, target sockaddr or None).
Admitted = tuple[str, str, str, str | None, str | None, tuple[Any, ...] | None]


def handed_over(admitted: Admitted) -> Grant:
    """The Grant of a connection past its handshake. Tunnels keep the plain tuple: a
    Grant built at every hand-over cost ~5,500 instructions a tunnel (263,389 ->
    257,873 on user/password + hostname, bench/instructions.py), and only a reload
    ever reads one."""
    protocol, client_ip, ingress_ip, user, credential, target = admitted
    return Grant(
        protocol,
        normalize_ip(client_ip),
        ingress_ip,
        user,
        credential,
        None if target is None else (target[0], target[1]),
    )


def revoked_by(
    grant: Grant,
    config: Config,
    clients: ClientPolicy,
    destinations: DestinationPolicy,
    client_users: ClientUsers,
) -> str | None:
    """None if `config` still allows the connection `grant` describes, else why not.

    `clients`, `destinations` and `client_users` (the whitelists) are built from
    `config`.
    """
    if grant.protocol and grant.protocol not in config.protocols:
        return PROTOCOL_OFF
    if not clients.allows(grant.client_ip):
        return clients.refusing_rule(grant.client_ip)
    user = grant.user
    rules = _NO_USER
    method = config.auth.method
    if method != "none":
        if user is None:
            return None if grant.logging_in else AUTH_REQUIRED
        rules = config.access.users.get(user, _NO_USER)
        if grant.credential == IP_LOGIN:  # known by its address, no password
            if "ip" not in method or method == "ip_and_password":
                return AUTH_REQUIRED
            if client_users.user_of(grant.client_ip) != user:
                return (
                    USER_REMOVED
                    if user not in config.access.users
                    else f"access.users.{user}.clients"
                )
        elif grant.credential is None and "ip" in method:
            # Named by a SOCKS4 USERID, no password: under the "ip" methods only its
            # address may say who it is (and ip_and_password takes no SOCKS4 at all).
            if method == "ip_and_password" or client_users.user_of(grant.client_ip) != user:
                return AUTH_REQUIRED
        elif method == "ip":
            # Passwords are no longer a way in, but a login from the user's own address
            # would be that user now without one: it stays (its ingress is checked below).
            if client_users.user_of(grant.client_ip) != user:
                return AUTH_REQUIRED
        else:
            stored = config.auth.users.get(user)
            if stored is None and (grant.credential is not None or "ip" not in method):
                return USER_REMOVED
            if grant.credential is not None and stored != grant.credential:
                return PASSWORD_CHANGED
            if method == "ip_and_password" and client_users.user_of(grant.client_ip) != user:
                return f"access.users.{user}.clients"
        if rules.ingress and not ingress_allowed(rules.ingress, grant.ingress_ip):
            return f"access.users.{user}.ingress"
    if grant.target is not None:
        ip, port = grant.target
        verdict = destinations.check(ip, port, grant.ingress_ip, rules.destinations)
        if verdict is not None:
            return verdict.rule
    return None
