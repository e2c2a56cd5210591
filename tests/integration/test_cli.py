"""The socksd command as an operator runs it."""

from __future__ import annotations

import socket
import subprocess
import sys

from socksd.passwords import parse_hash, verify_password
from tests.integration.helpers import REPO


def _socksd(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "socksd", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )


def test_check_config_accepts_example_and_rejects_bad(tmp_path):
    ok = _socksd("--check-config", "--config", str(REPO / "etc" / "socksd.toml"))
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('listen = ["127.0.0.1:1080"]\n[timeouts]\nconect = 3\n')
    result = _socksd("--check-config", "--config", str(bad))
    assert result.returncode == 2
    assert "timeouts.conect: unknown key" in result.stderr


def test_passwd_prints_a_verifiable_hash():
    result = _socksd("passwd", stdin="s3cret\n")
    assert result.returncode == 0, result.stderr
    stored = parse_hash(result.stdout.strip())
    assert verify_password(b"s3cret", stored)
    assert "s3cret" not in result.stdout


def test_listen_address_in_use_fails_clearly():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        result = _socksd("--listen", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr


def test_help_lists_the_flags():
    result = _socksd("--help")
    assert result.returncode == 0
    for flag in ("--config", "--listen", "--workers", "--check-config"):
        assert flag in result.stdout
