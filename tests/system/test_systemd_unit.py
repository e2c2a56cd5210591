"""The shipped systemd unit and sysctl.d file: accepted by the tools that will read them.

`systemd-analyze verify` (Debian: package `systemd`) checks every directive and that each
Exec*= binary is executable (/bin/kill for ExecReload=: package `procps`). The unit names
/usr/local/bin/socksd, which a test host does not have, so the test verifies a copy whose
socksd paths point at an existing executable; nothing else is changed. The verifier
reports unknown or unparsable directives as warnings with exit status 0, so its output
is checked too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from socksd import kernel
from socksd.config import ListenAddress, load_config
from socksd.errors import EXIT_BOOT, EXIT_CONFIG
from tests.conftest import need

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "socksd.service"
SYSCTL = ROOT / "etc" / "sysctl.d" / "90-socksd.conf"
INSTALLED_BINARY = "/usr/local/bin/socksd"
DRAIN_S = 30.0  # Config.shutdown_timeout default, which TimeoutStopSec= must exceed
# `systemd-analyze security` exposure, scaled x10 as --threshold= expects (1.5 -> 15).
# Rated 1.5 by systemd 252; the margin absorbs rating changes between versions.
MAX_EXPOSURE_X10 = 25


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    need(path is not None, "systemd-analyze not installed (Debian: apt-get install systemd)")
    assert path is not None
    return path


def _stand_in_binary() -> str:
    """An existing executable to stand in for /usr/local/bin/socksd."""
    console_script = Path(sys.executable).parent / "socksd"
    if os.access(console_script, os.X_OK):
        return str(console_script)
    return shutil.which("true") or "/bin/true"


def _verifiable_copy(tmp_path: Path) -> Path:
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_BINARY} " in text
    unit = tmp_path / UNIT.name  # the file name is the unit name: keep it
    unit.write_text(text.replace(INSTALLED_BINARY, _stand_in_binary()))
    return unit


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _directives(text: str) -> dict[str, list[str]]:
    """Unit file as "Section.Key" -> values (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = _systemd_analyze()
    # ExecReload= must exist too, or verify complains about the unit (Debian: procps).
    need(os.access("/bin/kill", os.X_OK), "/bin/kill missing (Debian: apt-get install procps)")
    unit = _verifiable_copy(tmp_path)
    result = _run([analyze, "verify", "--man=no", str(unit)], cwd=tmp_path)
    output = result.stdout + result.stderr
    about_unit = [line for line in output.splitlines() if UNIT.name in line]
    assert result.returncode == 0, output
    assert about_unit == [], output


def test_unit_sandboxing_is_rated_ok(tmp_path):
    analyze = _systemd_analyze()
    unit = _verifiable_copy(tmp_path)
    result = _run(
        [
            analyze,
            "security",
            "--offline=true",
            f"--threshold={MAX_EXPOSURE_X10}",
            "--no-pager",
            str(unit),
        ],
        cwd=tmp_path,
    )
    overall = [line for line in result.stdout.splitlines() if "Overall exposure" in line]
    assert result.returncode == 0, (overall or [result.stdout + result.stderr])[-1]


def test_unit_matches_socksd_contract():
    d = _directives(UNIT.read_text())
    assert d["Service.Type"] == ["notify"]
    assert d["Service.NotifyAccess"] == ["main"]
    assert d["Service.KillMode"] == ["mixed"]
    assert d["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    prevent = {int(code) for code in d["Service.RestartPreventExitStatus"][0].split()}
    assert prevent == {EXIT_CONFIG, EXIT_BOOT}
    assert float(d["Service.TimeoutStopSec"][0]) > DRAIN_S
    assert d["Service.RuntimeDirectory"] == ["socksd"]
    assert d["Service.ExecStartPre"][0].startswith(f"{INSTALLED_BINARY} --check-config ")
    families = set(d["Service.RestrictAddressFamilies"][0].split())
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}


def test_unit_fd_limit_needs_no_raise_and_earns_no_warning():
    """LimitNOFILE= is one value (soft = hard: socksd has nothing to raise under the unit)
    that carries a worker of the reference config past the tunnel floor."""
    [value] = _directives(UNIT.read_text())["Service.LimitNOFILE"]
    assert ":" not in value, "soft and hard alike: socksd only raises soft to hard"
    limit = int(value)
    assert kernel.nofile_soft_target(limit, limit) is None
    limits = kernel.NofileLimits(soft_at_start=limit, soft=limit, hard=limit)
    for config in (load_config(None), load_config(ROOT / "etc" / "socksd.toml")):
        assert config.worker_tunnel_limit() == 0  # so the floor is what is checked
        assert kernel.check_nofile(limits, config) == []


_SYSCTL_LINE = re.compile(r"^(?P<key>[a-z0-9_.]+)\s*=\s*(?P<value>\S(?:.*\S)?)$")


def _sysctl_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    for number, raw in enumerate(SYSCTL.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        match = _SYSCTL_LINE.match(line)
        assert match, f"{SYSCTL.name}:{number}: not `key = value`: {raw!r}"
        assert match["key"] not in settings, f"{SYSCTL.name}:{number}: duplicate key"
        settings[match["key"]] = match["value"]
    assert settings, "no settings at all"
    return settings


def test_sysctl_file_parses_and_every_key_exists():
    settings = _sysctl_settings()
    proc_sys = Path("/proc/sys")
    need(proc_sys.joinpath("net", "ipv4").is_dir(), "/proc/sys/net/ipv4 is not mounted")
    missing = [key for key in settings if not proc_sys.joinpath(*key.split(".")).is_file()]
    assert missing == [], f"not under /proc/sys on this kernel: {missing}"


def test_sysctl_file_satisfies_socksd_start_up_checks(tmp_path):
    """The values, read the way socksd reads /proc/sys, earn no warning for port 1080."""
    prefix = "net.ipv4."
    for key, value in _sysctl_settings().items():
        if key.startswith(prefix):
            (tmp_path / key.removeprefix(prefix)).write_text(value + "\n")
    settings = kernel.read_kernel_settings(tmp_path)
    assert settings.ephemeral_ports > 60_000
    listening = [ListenAddress("0.0.0.0", 1080), ListenAddress("::", 1080)]
    assert kernel.check(settings, listening) == []
    assert settings.reuse_window(loopback=False) <= 1.0
