"""Salted scrypt password hashes for RFC 1929 users.

Owns: the hash format `scrypt$N$r$p$salt$hash` (base64 without padding), hashing and
constant-time verification.
Must not: log, or keep a password anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

# N=2**14, r=8 costs ~16 MiB and ~40 ms per check: slow enough to blunt an offline
# attack on a leaked config, fast enough for a worker's thread pool.
DEFAULT_N = 1 << 14
DEFAULT_R = 8
DEFAULT_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
_SCHEME = "scrypt"


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """A parsed password hash, as stored in the config."""

    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def encode(self) -> str:
        """Return the text form stored in the config."""
        return "$".join(
            (_SCHEME, str(self.n), str(self.r), str(self.p), _b64(self.salt), _b64(self.digest))
        )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _derive(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, maxmem=128 * r * n * 2 + (1 << 20), dklen=_KEY_BYTES
    )


def hash_password(password: str | bytes) -> str:
    """Hash a password with a fresh random salt.

    Args:
        password: the clear-text password (str is encoded as UTF-8).

    Returns:
        The encoded hash, e.g. ``scrypt$16384$8$1$<salt>$<digest>``.
    """
    raw = password.encode("utf-8") if isinstance(password, str) else password
    salt = os.urandom(_SALT_BYTES)
    digest = _derive(raw, salt, DEFAULT_N, DEFAULT_R, DEFAULT_P)
    return PasswordHash(DEFAULT_N, DEFAULT_R, DEFAULT_P, salt, digest).encode()


def parse_hash(encoded: str) -> PasswordHash:
    """Parse an encoded hash.

    Raises:
        ValueError: the text is not a hash this module produced.
    """
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != _SCHEME:
        raise ValueError("expected scrypt$N$r$p$salt$hash (make one with `socksd passwd`)")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except ValueError as exc:
        raise ValueError(f"malformed scrypt hash: {exc}") from None
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or not salt or not digest:
        raise ValueError("scrypt parameters out of range")
    return PasswordHash(n, r, p, salt, digest)


def verify_password(password: bytes, stored: PasswordHash) -> bool:
    """Check a password against a stored hash in constant time (for a given hash)."""
    candidate = _derive(password, stored.salt, stored.n, stored.r, stored.p)
    return hmac.compare_digest(candidate, stored.digest)
