"""/etc/hosts, read the way the system resolver reads it, for the c-ares backend.

Owns: the name -> addresses table of the hosts file (every line that names a host,
both families, in file order, as glibc's "files" source merges them), and re-reading
it when its modification time or size changes (checked at most once a second).
Must not: block for long: the file is small and local, read with one `open()`; a
missing or unreadable file is an empty table.

Why not c-ares' own: c-ares 1.34 answers a name from the first hosts line that names
it only, so `127.0.0.33 dual.test` + `::1 dual.test` gives no IPv6 address and sends
an AAAA query instead; glibc returns both. socksd answers hosts names itself, before
c-ares sees them.
"""

from __future__ import annotations

import os
import socket

from workers.dnscache import Ips

PATH = "/etc/hosts"
_CHECK_EVERY = 1.0  # seconds between stat() calls of the file


class HostsFile:
    """The hosts table; `get(name, now)` is the hot call (a dict lookup)."""

    __slots__ = ("_path", "_table", "_stamp", "_next_check")

    def __init__(self, path: str = PATH) -> None:
        self._path = path
        self._table: dict[str, Ips] = {}
        self._stamp: tuple[int, int] | None = None
        self._next_check = 0.0

    def get(self, name: str, now: float) -> Ips | None:
        """The addresses the file gives `name` (lower case), or None."""
        if now >= self._next_check:
            self._next_check = now + _CHECK_EVERY
            self._refresh()
        return self._table.get(name)

    def _refresh(self) -> None:
        try:
            st = os.stat(self._path)
        except OSError:
            self._table, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            with open(self._path, encoding="utf-8", errors="replace") as f:
                self._table = parse(f.read())
        except OSError:
            self._table = {}


def parse(text: str) -> dict[str, Ips]:
    """`IP name [alias ...]` lines; `#` starts a comment; bad addresses are skipped."""
    merged: dict[str, dict[tuple[socket.AddressFamily, str], None]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        address = fields[0].split("%", 1)[0]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            address = socket.inet_ntop(family, socket.inet_pton(family, address))
        except OSError:
            continue
        for name in fields[1:]:
            merged.setdefault(name.lower(), {})[(family, address)] = None
    return {
        name: tuple(sorted(ips, key=lambda item: item[0] != socket.AF_INET))
        for name, ips in merged.items()
    }
