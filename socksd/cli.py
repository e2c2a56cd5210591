"""The `socksd` command: argument parsing, wiring and exit codes.

Owns: the command line, `--check-config`, `socksd passwd`, mapping errors to exit codes.
Must not: hold logic of its own; it composes config, listeners and the worker.

Usage:
    socksd [--config PATH] [--listen HOST:PORT ...] [--workers N]
    socksd --check-config [--config PATH]
    socksd passwd            (reads a password on stdin, prints its hash)
"""

from __future__ import annotations

import argparse
import sys

from socksd import logs
from socksd.config import Config, load_config, with_overrides
from socksd.errors import EXIT_CONFIG, EXIT_OK, SocksdError
from socksd.listeners import open_listeners
from socksd.passwords import hash_password


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="socksd",
        description="SOCKS5 proxy whose egress leaves from the IP the client came in on.",
        epilog="`socksd passwd` reads a password on stdin and prints a hash for auth.users.",
    )
    p.add_argument("--config", metavar="PATH", help="TOML config (default: embedded)")
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        action="append",
        help="listen address (repeatable; replaces the config's list; IPv6 as [::1]:1080)",
    )
    p.add_argument("--workers", metavar="N", help='worker processes: "auto" or a number')
    p.add_argument(
        "--check-config", action="store_true", help="validate the config and exit (0 = valid)"
    )
    return p


def _passwd() -> int:
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("socksd passwd: empty password", file=sys.stderr)
        return EXIT_CONFIG
    print(hash_password(password))
    return EXIT_OK


def _serve(config: Config) -> int:
    # Deferred import: `workers` builds on `socksd`; this module is the composition root.
    from workers.main import run_worker

    logs.configure(config.log.level)
    listeners = open_listeners(config.listen)
    if isinstance(config.workers, int) and config.workers > 1:
        # One worker process until the supervisor lands; say so rather than pretend.
        logs.get_logger().warning("workers_not_supported_yet", requested=config.workers, running=1)
    return run_worker(config, listeners, slot=0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `socksd` console script and `python -m socksd`."""
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["passwd"]:
        return _passwd()
    args = _parser().parse_args(args_list)
    try:
        config = with_overrides(load_config(args.config), args.listen, args.workers)
        if args.check_config:
            print(f"{config.source}: ok ({len(config.listen)} listen address(es))")
            return EXIT_OK
        return _serve(config)
    except SocksdError as exc:
        print(f"socksd: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
