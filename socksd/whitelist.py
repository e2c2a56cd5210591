"""Users known by their source address ("whitelisted IPs"): `access.users.NAME.clients`.

Owns: `ClientUsers`, the pure look-up from a client IP to the one user whose `clients`
networks hold it, and the check that no two users' networks overlap (which would make
the look-up ambiguous).
Must not: decide whether that user may use the ingress IP or the destination
(`socksd.access`, `workers.admission` do), or read the config file.

The look-up is a binary search over each family's ranges, sorted and disjoint: a
provider may whitelist thousands of customer networks.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

from socksd.access import Net, ip_key

_BITS = {4: 32, 6: 128}


def _span(net: Net) -> tuple[int, int]:
    """The first and last address of `net` as integers."""
    full = (1 << _BITS[net.version]) - 1
    return net.base, net.base | (full ^ net.mask)


class ClientUsers:
    """Client IP -> user, from each user's `clients` networks (disjoint)."""

    def __init__(self, clients: Mapping[str, Sequence[Net]]) -> None:
        """Raises: ValueError naming both users when two networks overlap."""
        ranges: dict[int, list[tuple[int, int, str]]] = {4: [], 6: []}
        for user, nets in clients.items():
            for version in (4, 6):
                # One user's own networks may nest or touch: merged first.
                spans = sorted(_span(n) for n in nets if n.version == version)
                merged: list[list[int]] = []
                for first, last in spans:
                    if merged and first <= merged[-1][1] + 1:
                        merged[-1][1] = max(merged[-1][1], last)
                    else:
                        merged.append([first, last])
                ranges[version] += [(first, last, user) for first, last in merged]
        self._starts: dict[int, list[int]] = {}
        self._ranges: dict[int, list[tuple[int, int, str]]] = {}
        for version, owned in ranges.items():
            owned.sort()
            for (_, last, user), (first, _, other) in zip(owned, owned[1:], strict=False):
                if first <= last:
                    raise ValueError(f"the clients of users {user!r} and {other!r} overlap")
            self._ranges[version] = owned
            self._starts[version] = [first for first, _, _ in owned]
        self.empty = not (ranges[4] or ranges[6])

    def user_of(self, ip: str) -> str | None:
        """The user whose `clients` hold `ip` (an IPv4-mapped IPv6 address counts as
        its IPv4 one), or None."""
        key = ip_key(ip)
        if key is None:
            return None
        version, value = key
        starts = self._starts[version]
        i = bisect.bisect_right(starts, value) - 1
        if i < 0:
            return None
        first, last, user = self._ranges[version][i]
        return user if first <= value <= last else None
