"""What a reload changes: the sections that differ, and the settings that wait for a
restart.

Owns: the list of settings a running proxy cannot change in place (`RESTART_ONLY`),
carrying their running values over into a reloaded config, and naming the changed
sections for the `reload_done` event.
Must not: read files or talk to workers (the supervisor does), or validate (config
does).

Everything else changes in place: the supervisor sends the new config to every running
worker (`socksd.channel`), which swaps it in between two loop passes.
"""

from __future__ import annotations

from dataclasses import fields, replace

from socksd.config import Config

# Settings that keep their running value until a restart, and why:
#   accounting.enabled each worker makes its books (or none) at start
#   control.socket    the supervisor's own socket; `socksd reload` is talking to it
#   metrics.listen    the supervisor's own listener
#   relay.splice      each worker's pipe pool, lent out to live tunnels
#   resolver.backend  each worker's resolver and its thread pool
#   resolver.threads  (scrypt runs in that pool too)
RESTART_ONLY = (
    "accounting.enabled",
    "control.socket",
    "metrics.listen",
    "relay.splice",
    "resolver.backend",
    "resolver.threads",
)

# Config field -> the TOML section (or top-level key) it comes from.
_SECTIONS = {
    "listen": "listen",
    "workers": "workers",
    "timeouts": "timeouts",
    "auth": "auth",
    "log": "log",
    "resolver": "resolver",
    "egress": "egress",
    "shutdown_timeout": "shutdown_timeout",
    "stats": "stats",
    "control": "control",
    "metrics_listen": "metrics",
    "metrics": "metrics",
    "accounting": "accounting",
    "udp": "udp",
    "relay_splice": "relay",
    "access": "access",
    "limits": "limits",
    "protocols": "protocols",
}


def _restart_values(config: Config) -> tuple[object, ...]:
    return (
        config.accounting.enabled,
        config.control.socket,
        config.metrics_listen,
        config.relay_splice,
        config.resolver.backend,
        config.resolver.threads,
    )


def needs_restart(old: Config, new: Config) -> list[str]:
    """The settings of RESTART_ONLY that `new` changes."""
    pairs = zip(RESTART_ONLY, _restart_values(old), _restart_values(new), strict=True)
    return [key for key, was, now in pairs if was != now]


def carry_over(old: Config, new: Config) -> Config:
    """`new` with the running values of the RESTART_ONLY settings."""
    return replace(
        new,
        accounting=replace(new.accounting, enabled=old.accounting.enabled),
        control=old.control,
        metrics_listen=old.metrics_listen,
        relay_splice=old.relay_splice,
        resolver=replace(new.resolver, backend=old.resolver.backend, threads=old.resolver.threads),
    )


def changed_sections(old: Config, new: Config) -> list[str]:
    """The sections (top-level keys) whose values differ between `old` and `new`."""
    changed = (
        _SECTIONS[f.name]
        for f in fields(Config)
        if f.name in _SECTIONS and getattr(old, f.name) != getattr(new, f.name)
    )
    return list(dict.fromkeys(changed))  # metrics.listen and metrics.per_user: one section
