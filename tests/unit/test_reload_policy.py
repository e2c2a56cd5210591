"""Pure parts of a reload: revocation decisions, changed sections, the users file,
and the supervisor <-> worker frame format (over a real socketpair)."""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from socksd import reloading
from socksd.access import ClientPolicy, DestinationPolicy
from socksd.channel import APPLIED, CONFIG, Channel, ChannelError
from socksd.config import Config, load_config, parse_config
from socksd.errors import ConfigError
from socksd.revocation import Grant, revoked_by
from socksd.whitelist import ClientUsers

H1 = "scrypt$16384$8$1$c2FsdHNhbHRzYWx0c2FsdA$ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGk"
H2 = "scrypt$16384$8$1$b3RoZXJzYWx0b3RoZXJzYQ$ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGk"


def _config(extra: str = "") -> Config:
    import tomllib

    text = (
        'listen = ["127.0.0.1:1080"]\n[auth]\nmethod = "password"\n'
        f'[auth.users]\nalice = "{H1}"\nbob = "{H1}"\n' + extra
    )
    return parse_config(tomllib.loads(text), "<test>")


def _decide(grant: Grant, config: Config) -> str | None:
    clients = ClientPolicy(config.access.clients, loopback_only=config.loopback_only)
    destinations = DestinationPolicy(config.access.destinations, [("127.0.0.1", 1080)])
    users = ClientUsers({n: ua.clients for n, ua in config.access.users.items() if ua.clients})
    return revoked_by(grant, config, clients, destinations, users)


def _grant(user: str | None = "alice", target=("192.0.2.7", 443), **kw) -> Grant:
    fields = dict(
        protocol="socks5",
        client_ip="127.0.0.1",
        ingress_ip="127.0.0.1",
        user=user,
        credential=H1,
        target=target,
    )
    fields.update(kw)
    return Grant(**fields)


def test_unchanged_config_revokes_nothing():
    assert _decide(_grant(), _config()) is None


def test_each_change_names_itself():
    cfg = _config()
    removed = replace(cfg, auth=replace(cfg.auth, users={"bob": H1}))
    assert _decide(_grant(), removed) == "user_removed"
    changed = replace(cfg, auth=replace(cfg.auth, users={"alice": H2}))
    assert _decide(_grant(), changed) == "password_changed"
    ingress = _config('[access.users.alice]\ningress = ["127.0.0.2"]\n')
    assert _decide(_grant(), ingress) == "access.users.alice.ingress"
    assert _decide(_grant(user="bob"), ingress) is None  # only alice's rule changed
    deny = _config('[[access.destinations]]\naction = "deny"\nto = ["192.0.2.0/24"]\n')
    assert _decide(_grant(), deny) == "access.destinations[0]"
    assert _decide(_grant(target=("198.51.100.1", 443)), deny) is None
    own = _config(
        '[[access.users.alice.destinations]]\naction = "deny"\nto = ["192.0.2.7"]\nports = [443]\n'
    )
    assert _decide(_grant(), own) == "access.users.alice.destinations[0]"
    assert _decide(_grant(target=None), own) is None  # UDP: checked per datagram


def test_auth_switched_on_revokes_tunnels_without_a_user_but_not_logins_under_way():
    cfg = _config()
    assert _decide(_grant(user=None, credential=None), cfg) == "auth.method"
    assert _decide(_grant(user=None, credential=None, logging_in=True), cfg) is None


def test_clients_and_protocols():
    rule = '[[access.clients]]\naction = "deny"\nfrom = ["127.0.0.1"]\n'
    rule += '[[access.clients]]\naction = "allow"\nfrom = ["0.0.0.0/0"]\n'
    assert _decide(_grant(), _config(rule)) == "access.clients[0]"
    assert _decide(_grant(protocol="socks4", credential=None), _config()) == "protocols"
    # A connection that has not sent a byte has no door yet: not revoked for one.
    assert (
        _decide(_grant(protocol="", user=None, credential=None, logging_in=True), _config()) is None
    )


def test_a_switch_to_ip_keeps_password_logins_from_the_users_own_address_only():
    import tomllib

    text = 'listen = ["127.0.0.1:1080"]\n[auth]\nmethod = "ip"\n'
    text += f'[auth.users]\nalice = "{H1}"\nbob = "{H1}"\n'
    text += '[access.users.alice]\nclients = ["127.0.0.1/32"]\n'
    ip = parse_config(tomllib.loads(text), "<test>")
    assert _decide(_grant(), ip) is None  # alice's password login, from alice's address
    assert _decide(_grant(client_ip="127.0.0.2"), ip) == "auth.method"  # from elsewhere
    assert _decide(_grant(user="bob"), ip) == "auth.method"  # 127.0.0.1 is not bob's
    # Under ip, a password that changed no longer matters: the address says who it is.
    changed = replace(ip, auth=replace(ip.auth, users={"alice": H2}))
    assert _decide(_grant(), changed) is None


def test_auth_none_keeps_user_tunnels():
    cfg = _config()
    none = replace(cfg, auth=replace(cfg.auth, method="none", users={}))
    assert _decide(_grant(), none) is None


def test_restart_only_settings_keep_their_running_values():
    old = _config()
    new = replace(
        old,
        relay_splice=False,
        resolver=replace(old.resolver, threads=9, timeout=2.0),
        timeouts=replace(old.timeouts, idle=5.0),
    )
    assert reloading.needs_restart(old, new) == ["relay.splice", "resolver.threads"]
    applied = reloading.carry_over(old, new)
    assert applied.relay_splice is True and applied.resolver.threads == old.resolver.threads
    assert applied.resolver.timeout == 2.0  # the rest of the section does change
    assert reloading.changed_sections(old, applied) == ["timeouts", "resolver"]


def test_users_file(tmp_path: Path):
    (tmp_path / "users.toml").write_text(
        f'[users.carol]\npassword = "{H2}"\ningress = ["127.0.0.2"]\nmax_tunnels = 3\n'
        f'[users.dave]\npassword = "{H1}"\n'
    )
    main = tmp_path / "socksd.toml"
    main.write_text(
        'listen = ["127.0.0.1:1080"]\n[auth]\nmethod = "password"\nusers_file = "users.toml"\n'
        f'watch = true\n[auth.users]\nalice = "{H1}"\n'
    )
    cfg = load_config(main)
    assert set(cfg.auth.users) == {"alice", "carol", "dave"}
    assert cfg.auth.users["carol"] == H2
    assert cfg.access.users["carol"].max_tunnels == 3
    assert "dave" not in cfg.access.users  # no rules: nothing kept for him
    (tmp_path / "users.toml").write_text(f'[users.carol]\npassword = "{H2}"\nmax_tunels = 3\n')
    with pytest.raises(ConfigError, match=r"users\.toml\): users\.carol\.max_tunels: unknown"):
        load_config(main)
    (tmp_path / "users.toml").write_text(f'[users.alice]\npassword = "{H2}"\n')
    with pytest.raises(ConfigError, match="auth.users.alice: also in auth.users_file"):
        load_config(main)
    (tmp_path / "users.toml").write_text("[users.carol\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(main)


def test_channel_frames_and_descriptors_over_a_socketpair():
    a_sock, b_sock = Channel.pair()
    a, b = Channel(a_sock), Channel(b_sock)
    r, w = os.pipe()
    try:
        big = {"users": {f"u{i}": "x" * 50 for i in range(20_000)}}  # ~1.3 MB: many writes
        a.send(CONFIG, big, fds=(r,))
        a.send(APPLIED, {"reload": 1})
        frames = []
        while a.wants_write() or len(frames) < 2:
            a.write()
            got = b.read()
            assert got is not None
            frames += got
        assert [f.kind for f in frames] == [CONFIG, APPLIED]
        assert frames[0].body == big and frames[1].body == {"reload": 1}
        (passed,) = frames[0].fds
        os.write(w, b"through the passed fd")
        assert os.read(passed, 100) == b"through the passed fd"
        os.close(passed)
        a.close()
        assert b.read() is None  # EOF
    finally:
        os.close(r)
        os.close(w)
        b.close()


def test_channel_refuses_a_frame_that_is_not_one():
    a_sock, b_sock = socket.socketpair()
    b = Channel(b_sock)
    a_sock.sendall(b"\x00\x00\x00\x04\x01\x00abcd")  # 4 bytes that do not unpickle
    with pytest.raises(ChannelError):
        b.read()
    a_sock.close()
    b.close()
