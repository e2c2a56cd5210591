"""The `socksd` command: argument parsing, wiring and exit codes.

Owns: the command line, `--check-config`, `socksd passwd`, `socksd stats`,
`socksd tunnels`, `socksd kick`, mapping
errors to exit codes, and injecting the worker entry point into the supervisor (this
module is the composition root: the only place in `socksd` that imports `workers`).
Must not: hold logic of its own.

Usage:
    socksd [--config PATH] [--listen HOST:PORT ...] [--workers N]
    socksd --check-config [--config PATH]
    socksd stats [--users | --ingress] [--json] [--config PATH | --socket PATH]
    socksd tunnels [--user U] [--ingress IP] [--json] [--config PATH | --socket PATH]
    socksd kick (--user U | --ingress IP | --conn PID:ID) [--config PATH | --socket PATH]
    socksd reload [--config PATH | --socket PATH]
    socksd passwd            (reads a password on stdin, prints its hash)
"""

from __future__ import annotations

import argparse
import os
import sys

import orjson

from socksd import logs, usage
from socksd.config import Config, load_config, with_overrides
from socksd.control import LATER_TIMEOUT, format_table, query
from socksd.errors import EXIT_CONFIG, EXIT_OK, SocksdError, UsageError
from socksd.passwords import hash_password


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="socksd",
        description="SOCKS5 proxy whose egress leaves from the IP the client came in on.",
        epilog="Other commands: `socksd stats [--users | --ingress] [--json] [--config PATH]` "
        "shows a running socksd's figures (per user, per ingress IP); `socksd tunnels` lists "
        "its live tunnels and `socksd kick` closes some; `socksd reload [--config PATH]` "
        "makes it re-read its config and prints the outcome (exit status 2: the config "
        "is invalid, nothing changed); "
        "`socksd passwd` reads a password on stdin and prints a hash for auth.users.",
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


def _control_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH", help="the config the server runs with")
    p.add_argument("--socket", metavar="PATH", help="control socket (default: from the config)")


def _socket(args: argparse.Namespace) -> str:
    return str(args.socket or load_config(args.config).control.path())


def _print_json(result: object) -> None:
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")


def _stats(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="socksd stats", description="figures of a running socksd")
    _control_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--users", action="store_true", help="per user, most bytes first")
    which.add_argument("--ingress", action="store_true", help="per ingress IP, with its egress")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    path = _socket(args)
    if args.users or args.ingress:
        kind = "users" if args.users else "ingress"
        rows = query(path, kind).get(kind, [])
        if args.json:
            _print_json(rows)
        else:
            print(usage.format_users(rows) if args.users else usage.format_ingress(rows))
        return EXIT_OK
    result = query(path)
    if args.json:
        _print_json(result)
    else:
        print(format_table(result))
    return EXIT_OK


def _ask(command: str, fields: dict[str, str], path: str) -> dict[str, object]:
    """A tunnel query's outcome; a refused query is an error (exit status 2)."""
    outcome = query(path, f"{command} {orjson.dumps(fields).decode()}", timeout=LATER_TIMEOUT)
    if not outcome.get("ok"):
        raise UsageError(f"{command}: {outcome.get('error', 'failed')}")
    return outcome


def _tunnels(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="socksd tunnels", description="the live tunnels")
    _control_args(p)
    p.add_argument("--user", metavar="U", help="only this user's ('' : tunnels without a user)")
    p.add_argument("--ingress", metavar="IP", help="only those that came in on this IP")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    fields = {k: v for k, v in (("user", args.user), ("ingress", args.ingress)) if v is not None}
    outcome = _ask("tunnels", fields, _socket(args))
    rows = outcome["tunnels"]
    if args.json:
        _print_json(rows)
    else:
        print(usage.format_tunnels(rows))  # type: ignore[arg-type]
    return _unanswered(outcome)


def _kick(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="socksd kick", description='close tunnels now (their line says reason "kicked")'
    )
    _control_args(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--user", metavar="U", help="every tunnel of this user")
    which.add_argument("--ingress", metavar="IP", help="every tunnel that came in on this IP")
    which.add_argument("--conn", metavar="PID:ID", help="one tunnel, as `socksd tunnels` names it")
    args = p.parse_args(argv)
    fields = {
        k: v
        for k, v in (("user", args.user), ("ingress", args.ingress), ("conn", args.conn))
        if v is not None
    }
    outcome = _ask("kick", fields, _socket(args))
    print(f"kicked {outcome['count']} tunnel(s)")
    if args.conn and not outcome["count"]:
        # pid:conn_id names a tunnel while that worker lives: it ended, or the worker did.
        print(f"socksd kick: no open tunnel {args.conn}", file=sys.stderr)
        return 1
    return _unanswered(outcome)


def _unanswered(outcome: dict[str, object]) -> int:
    if outcome.get("workers_unanswered"):
        print(f"workers that did not answer: {outcome['workers_unanswered']}", file=sys.stderr)
        return 1
    return EXIT_OK


def _reload(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="socksd reload",
        description="make a running socksd re-read its config (as SIGHUP does) and wait "
        "for the outcome",
    )
    _control_args(p)
    args = p.parse_args(argv)
    outcome = query(_socket(args), "reload", timeout=LATER_TIMEOUT)
    if not outcome.get("ok"):
        # Nothing changed: the running config keeps serving. The message names the key.
        print(f"socksd reload: {outcome.get('error', 'failed')}", file=sys.stderr)
        return EXIT_CONFIG
    revoked = outcome.get("revoked_total", 0)
    print(
        f"reloaded {outcome.get('config')} (reload {outcome.get('reload')}): "
        f"changed {', '.join(outcome.get('changed') or ['nothing'])}; "
        f"{revoked} connection(s) revoked; {outcome.get('workers_answered')} worker(s) "
        f"applied it in {outcome.get('duration_ms')} ms"
    )
    if outcome.get("needs_restart"):
        print(f"needs a restart to change: {', '.join(outcome['needs_restart'])}")
    if outcome.get("workers_unanswered"):
        # Applied by the others; the supervisor logged which did not answer in time.
        print(f"workers that did not answer: {outcome['workers_unanswered']}", file=sys.stderr)
        return 1
    return EXIT_OK


def _serve(args: argparse.Namespace, config: Config) -> int:
    # Deferred imports: `workers` builds on `socksd`; this module is the composition root.
    from socksd.supervisor import Supervisor
    from workers.main import run_worker

    def load() -> Config:
        return with_overrides(load_config(args.config), args.listen, args.workers)

    logs.configure(config.log.level)
    logs.bind_process(role="supervisor", pid=os.getpid())
    return Supervisor(config, load, run_worker).run()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `socksd` console script and `python -m socksd`."""
    args_list = sys.argv[1:] if argv is None else argv
    try:
        if args_list[:1] == ["passwd"]:
            return _passwd()
        if args_list[:1] == ["stats"]:
            return _stats(args_list[1:])
        if args_list[:1] == ["reload"]:
            return _reload(args_list[1:])
        if args_list[:1] == ["tunnels"]:
            return _tunnels(args_list[1:])
        if args_list[:1] == ["kick"]:
            return _kick(args_list[1:])
        args = _parser().parse_args(args_list)
        config = with_overrides(load_config(args.config), args.listen, args.workers)
        if args.check_config:
            print(f"{config.source}: ok ({len(config.listen)} listen address(es))")
            return EXIT_OK
        return _serve(args, config)
    except SocksdError as exc:
        print(f"socksd: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
