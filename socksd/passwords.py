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
import re
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


# The text form, checked without decoding it: a users file of 100,000 hashes is
# checked in ~0.15 s this way, ~0.5 s by decoding every salt and digest.
_FORMAT = re.compile(
    r"scrypt\$(\d{1,10})\$(\d{1,3})\$(\d{1,3})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
)


def check_hash(encoded: str) -> str:
    """Check that `encoded` is a hash `parse_hash()` will take; return it unchanged.

    Configs keep hashes as text (validated here): parsed only when a password is
    checked against one, which is rare (verified logins are cached).

    Raises:
        ValueError: the text is not a hash this module produced.
    """
    m = _FORMAT.fullmatch(encoded)
    if m is None:
        raise ValueError("expected scrypt$N$r$p$salt$hash (make one with `socksd passwd`)")
    n, r, p = int(m[1]), int(m[2]), int(m[3])
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16:
        raise ValueError("scrypt parameters out of range")
    if len(m[4]) % 4 == 1 or len(m[5]) % 4 == 1:
        raise ValueError("malformed scrypt hash: bad base64 length")
    return encoded


def parse_hash(encoded: str) -> PasswordHash:
    """Parse an encoded hash.

    Raises:
        ValueError: the text is not a hash this module produced.
    """
    check_hash(encoded)
    parts = encoded.split("$")
    try:
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except ValueError as exc:
        raise ValueError(f"malformed scrypt hash: {exc}") from None
    return PasswordHash(int(parts[1]), int(parts[2]), int(parts[3]), salt, digest)


def dummy_hash() -> str:
    """A hash no password matches, with the default cost: checking one costs what a
    real user's check costs. Made without running scrypt (a reload may build it on a
    worker's loop)."""
    salt, digest = os.urandom(_SALT_BYTES), os.urandom(_KEY_BYTES)
    return "$".join(
        (_SCHEME, str(DEFAULT_N), str(DEFAULT_R), str(DEFAULT_P), _b64(salt), _b64(digest))
    )


def verify_encoded(password: bytes, encoded: str) -> bool:
    """`verify_password()` against a hash in its text form (runs in the worker's pool)."""
    return verify_password(password, parse_hash(encoded))


def verify_password(password: bytes, stored: PasswordHash) -> bool:
    """Check a password against a stored hash in constant time (for a given hash)."""
    candidate = _derive(password, stored.salt, stored.n, stored.r, stored.p)
    return hmac.compare_digest(candidate, stored.digest)
