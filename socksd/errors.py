"""Error tree of socksd and the process exit codes it maps to.

Owns: the `SocksdError` hierarchy and exit codes.
Must not: import anything of socksd or workers.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_BOOT = 3


class SocksdError(Exception):
    """Base of every error socksd reports to an operator and exits on."""

    exit_code = EXIT_FAILURE


class ConfigError(SocksdError):
    """The configuration is invalid; the message names the dotted key."""

    exit_code = EXIT_CONFIG


class ListenError(SocksdError):
    """A listening socket could not be opened (address in use, not local, ...)."""

    exit_code = EXIT_FAILURE


class UsageError(SocksdError):
    """A command's arguments were refused (by the running server, e.g. a bad id)."""

    exit_code = EXIT_CONFIG
