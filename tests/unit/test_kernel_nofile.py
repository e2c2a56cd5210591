"""RLIMIT_NOFILE at start: the soft limit to set, what a worker needs, the warnings."""

from __future__ import annotations

import resource
import tomllib

import pytest

from socksd import kernel
from socksd.config import Config, parse_config
from socksd.kernel import (
    NofileLimits,
    check_nofile,
    nofile_needed,
    nofile_soft_target,
    raise_nofile_soft,
    tunnels_within,
)

INF = resource.RLIM_INFINITY


def _config(text: str = "") -> Config:
    return parse_config(tomllib.loads('listen = ["127.0.0.1:1080"]\nworkers = 2\n' + text), "<t>")


def _limits(soft: int, hard: int | None = None) -> NofileLimits:
    return NofileLimits(soft_at_start=1024, soft=soft, hard=soft if hard is None else hard)


def _events(limits: NofileLimits, config: Config) -> dict[str, dict]:
    return dict(check_nofile(limits, config))


def test_soft_target_is_the_hard_limit_and_never_more():
    assert nofile_soft_target(1024, 524288) == 524288
    assert nofile_soft_target(4096, 4096) is None  # systemd's LimitNOFILE=N: nothing to do
    assert nofile_soft_target(1024, INF) is None  # not settable for NOFILE on Linux
    assert nofile_soft_target(INF, INF) is None


def test_need_per_worker_and_its_inverse():
    # 2 per tunnel + 32 fixed + 1 listener + 4 per resolver thread + 256 splice pipes.
    assert nofile_needed(10_000, 1, 4, splice=True) == 20_000 + 32 + 1 + 16 + 512
    assert nofile_needed(10_000, 1, 4, splice=False) == 20_000 + 32 + 1 + 16
    for tunnels in (0, 1, 999, 10_000):
        for splice in (True, False):
            need = nofile_needed(tunnels, 3, 8, splice)
            assert tunnels_within(need, 3, 8, splice) == tunnels
            assert tunnels_within(need - 1, 3, 8, splice) == max(0, tunnels - 1)
    assert tunnels_within(100, 1, 4, splice=True) == 0


def test_no_tunnel_limit_warns_below_the_floor():
    config = _config()
    assert config.worker_tunnel_limit() == 0
    low = _events(_limits(4096), config)["nofile_limit_low"]
    assert low["nofile_soft"] == low["nofile_hard"] == 4096
    assert low["nofile_soft_at_start"] == 1024
    assert low["worker_tunnel_limit"] == 0
    assert low["tunnels_wanted"] == kernel.NOFILE_FLOOR_TUNNELS == 10_000
    assert low["nofile_needed"] == 20_561
    assert low["tunnels_within_limit"] == (4096 - 561) // 2
    assert "LimitNOFILE=" in low["fix"] and "ulimit -Hn" in low["fix"]
    assert "max_tunnels" not in low["fix"]  # no limit to lower
    assert check_nofile(_limits(20_561), config) == []
    assert check_nofile(_limits(1_048_576), config) == []
    assert check_nofile(_limits(INF), config) == []


def test_configured_tunnel_limit_sets_the_need():
    fits = _config("[limits]\nmax_tunnels_per_worker = 1000\n")
    assert check_nofile(_limits(4096), fits) == []  # 2,561 needed
    high = _config("[limits]\nmax_tunnels_per_worker = 100000\n")
    low = _events(_limits(65536), high)["nofile_limit_low"]
    assert low["worker_tunnel_limit"] == low["tunnels_wanted"] == 100_000
    assert low["nofile_needed"] == 200_561
    assert "lower limits.max_tunnels" in low["fix"]
    assert check_nofile(_limits(1_048_576), high) == []
    # A proxy-wide figure is split per worker (2 workers here), like the limit itself.
    split = _config("[limits]\nmax_tunnels = 8000\n")
    assert _events(_limits(8192), split)["nofile_limit_low"]["tunnels_wanted"] == 4000
    assert check_nofile(_limits(8561), split) == []


def test_need_follows_listeners_resolver_threads_and_splice():
    text = "[limits]\nmax_tunnels_per_worker = 1000\n"
    base = nofile_needed(1000, 1, 4, splice=True)
    assert check_nofile(_limits(base), _config(text)) == []
    more = _config(text.replace("1000\n", "1000\n[resolver]\nthreads = 8\n"))
    assert _events(_limits(base), more)["nofile_limit_low"]["nofile_needed"] == base + 16
    no_splice = _config("[relay]\nsplice = false\n" + text)
    assert check_nofile(_limits(base - 512), no_splice) == []


def test_a_failed_raise_is_its_own_warning():
    failed = NofileLimits(soft_at_start=1024, soft=1024, hard=1_048_576, error="denied")
    events = _events(failed, _config())
    assert events["nofile_raise_failed"]["error"] == "denied"
    # The workers run with the soft limit, so that is what the need is compared with.
    assert events["nofile_limit_low"]["nofile_soft"] == 1024


class _FakeRlimit:
    def __init__(self, soft: int, hard: int, fail: Exception | None = None) -> None:
        self.limits = (soft, hard)
        self.fail = fail
        self.calls: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.calls.append(limits)
        if self.fail is not None:
            raise self.fail
        self.limits = limits


@pytest.mark.parametrize(
    ("soft", "hard", "calls", "after"),
    [
        (1024, 4096, [(4096, 4096)], 4096),
        (4096, 4096, [], 4096),  # already raised (systemd): no syscall, none to be denied
        (256, INF, [], 256),
    ],
)
def test_raise_sets_soft_to_hard_and_leaves_hard(monkeypatch, soft, hard, calls, after):
    fake = _FakeRlimit(soft, hard)
    monkeypatch.setattr(kernel.resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(kernel.resource, "setrlimit", fake.setrlimit)
    limits = raise_nofile_soft()
    assert fake.calls == calls
    assert limits == NofileLimits(soft_at_start=soft, soft=after, hard=hard)
    assert limits.as_log() == {
        "nofile_soft_at_start": soft,
        "nofile_soft": after,
        "nofile_hard": hard,
    }


def test_raise_failure_is_reported_not_raised(monkeypatch):
    fake = _FakeRlimit(1024, 4096, fail=PermissionError(1, "Operation not permitted"))
    monkeypatch.setattr(kernel.resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(kernel.resource, "setrlimit", fake.setrlimit)
    limits = raise_nofile_soft()
    assert (limits.soft_at_start, limits.soft, limits.hard) == (1024, 1024, 4096)
    assert limits.error is not None and "not permitted" in limits.error
