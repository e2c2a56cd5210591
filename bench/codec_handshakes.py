"""Instructions per SOCKS5 username/password handshake in the codec alone: generic vs fast.

    python bench/codec_handshakes.py [--handshakes 20000] [MODE ...]

For each mode, runs this file under valgrind's callgrind twice, with no handshakes and
with --handshakes, and prints the difference per handshake (Ir, user space: the
interpreter's start-up and imports cancel out). A handshake is a new codec, the
greeting, the credentials, a CONNECT request and the success reply; no sockets, no
session, no policy. Modes:

    generic        receive()/send() as the session drives them today, with the
                   next_event() it calls after each answer (curl's greeting 05 02 00 02)
    generic_bare   the same without those next_event() calls
    fast           accept_user_pass(), accept_credentials(), accept_auth(), then
                   receive() and send_success() (curl's greeting, a precomputed constant)
    fast_general   the same with 05 03 00 01 02 (accept_user_pass's general check)
    ctor           only Socks5ServerConnection(): the floor under every mode

A development tool, like bench/instructions.py; not part of the tests.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from socksd.socks5 import (  # noqa: E402
    AuthStatus,
    Method,
    MethodSelection,
    Socks5ServerConnection,
)

CURL = b"\x05\x02\x00\x02"  # curl, PySocks, browsers with credentials
GENERAL = b"\x05\x03\x00\x01\x02"
CREDENTIALS = b"\x01\x0bcustomer-42\x14" + b"s3cret-pass-w0rd-xyz"
REQUEST = b"\x05\x01\x00\x01\x5d\xb8\xd8\x22\x01\xbb"  # CONNECT 93.184.216.34:443
SELECT = MethodSelection(Method.USERNAME_PASSWORD)  # built once, as the session does


def generic(n: int, greeting: bytes) -> None:
    for _ in range(n):
        conn = Socks5ServerConnection(4096)
        conn.receive(greeting)
        conn.send(SELECT)
        conn.next_event()
        conn.receive(CREDENTIALS)
        conn.send(AuthStatus(True))
        conn.next_event()
        conn.receive(REQUEST)
        conn.send_success("10.0.0.1", 40000)


def generic_bare(n: int, greeting: bytes) -> None:
    for _ in range(n):
        conn = Socks5ServerConnection(4096)
        conn.receive(greeting)
        conn.send(SELECT)
        conn.receive(CREDENTIALS)
        conn.send(AuthStatus(True))
        conn.receive(REQUEST)
        conn.send_success("10.0.0.1", 40000)


def fast(n: int, greeting: bytes) -> None:
    # Nothing is buffered after accept_user_pass()/accept_auth(): no next_event() owed.
    for _ in range(n):
        conn = Socks5ServerConnection(4096)
        conn.accept_user_pass(greeting)
        conn.accept_credentials(CREDENTIALS)
        conn.accept_auth()
        conn.receive(REQUEST)
        conn.send_success("10.0.0.1", 40000)


def ctor(n: int, greeting: bytes) -> None:
    for _ in range(n):
        Socks5ServerConnection(4096)


MODES: dict[str, tuple[Callable[[int, bytes], None], bytes]] = {
    "generic": (generic, CURL),
    "generic_bare": (generic_bare, CURL),
    "fast": (fast, CURL),
    "fast_general": (fast, GENERAL),
    "ctor": (ctor, CURL),
}


def run(mode: str, n: int) -> None:
    """The measured process: check both ways agree, warm up, then n handshakes."""
    handshakes, greeting = MODES[mode]
    a, b = Socks5ServerConnection(4096), Socks5ServerConnection(4096)
    assert a.accept_user_pass(greeting) == (b.receive(greeting), b.send(SELECT))[1]
    assert a.accept_credentials(CREDENTIALS) is not None and b.receive(CREDENTIALS)
    assert a.accept_auth() == b.send(AuthStatus(True))
    assert a.receive(REQUEST) == b.receive(REQUEST)
    assert a.send_success("10.0.0.1", 1) == b.send_success("10.0.0.1", 1)
    handshakes(300, greeting)  # the address memo and the interpreter's specialisation
    handshakes(n, greeting)


def instructions(mode: str, n: int, tmp: Path) -> int:
    out = tmp / f"callgrind.{mode}.{n}"
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
         __file__, "--run", mode, str(n)],
        check=True,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )  # fmt: skip
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modes", nargs="*", help=f"some of {', '.join(MODES)} (default: all)")
    parser.add_argument("--handshakes", type=int, default=20000)
    parser.add_argument("--run", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run(args.run[0], int(args.run[1]))
        return
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes or MODES:
            base = instructions(mode, 0, Path(tmp))
            total = instructions(mode, args.handshakes, Path(tmp))
            print(f"{mode:14} {(total - base) / args.handshakes:9,.0f} instructions/handshake")


if __name__ == "__main__":
    main()
