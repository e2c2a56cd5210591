"""Pure egress accounting: kernel-setting checks, port-pressure counters, snapshot."""

from __future__ import annotations

import tomllib

import pytest

from socksd.config import ListenAddress, parse_config
from socksd.errors import ConfigError
from socksd.kernel import KernelSettings, check, parse_port_list, read_kernel_settings
from socksd.stats import EgressSnapshot
from workers.pressure import PortPressure


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def warning(self, event: str, **kw: object) -> None:
        self.lines.append(("warning", event, kw))

    def error(self, event: str, **kw: object) -> None:
        self.lines.append(("error", event, kw))

    def named(self, event: str) -> list[dict]:
        return [kw for _, e, kw in self.lines if e == event]


def _settings(**kw: object) -> KernelSettings:
    base = dict(
        port_range=(50000, 50099), tcp_tw_reuse=1, tcp_tw_reuse_delay_ms=1000, tcp_timestamps=1
    )
    base.update(kw)
    return KernelSettings(**base)  # type: ignore[arg-type]


def test_ephemeral_ports_minus_reserved():
    s = _settings(reserved_ports=((50010, 50019), (1080, 1080), (50099, 60000)))
    assert s.ephemeral_ports == 100 - 10 - 1
    assert parse_port_list("1080, 9000-9010,") == ((1080, 1080), (9000, 9010))


def test_reuse_window_follows_tw_reuse():
    assert _settings(tcp_tw_reuse=1, tcp_tw_reuse_delay_ms=250).reuse_window(False) == 0.25
    assert _settings(tcp_tw_reuse=0).reuse_window(True) == 60.0
    assert _settings(tcp_tw_reuse=2).reuse_window(False) == 60.0
    assert _settings(tcp_tw_reuse=2).reuse_window(True) == 1.0
    assert _settings(tcp_tw_reuse=1, tcp_timestamps=0).reuse_window(False) == 60.0


def test_checks_warn_about_listen_port_in_range_and_tw_reuse():
    inside = ListenAddress("0.0.0.0", 50050)
    outside = ListenAddress("127.0.0.1", 1080)
    events = dict(check(_settings(tcp_tw_reuse=2), [inside, outside]))
    assert events["listen_port_in_ephemeral_range"]["listen"] == "0.0.0.0:50050"
    assert "tcp_tw_reuse_not_enabled" in events
    reserved = _settings(reserved_ports=((50050, 50050),))
    assert check(reserved, [inside]) == []
    # Loopback-only egress is covered by tcp_tw_reuse = 2.
    assert check(_settings(tcp_tw_reuse=2), [outside]) == []
    assert "tcp_timestamps_disabled" in dict(check(_settings(tcp_timestamps=0), [outside]))


def test_read_kernel_settings_from_a_tree(tmp_path):
    (tmp_path / "ip_local_port_range").write_text("1024\t65535\n")
    (tmp_path / "ip_local_reserved_ports").write_text("1080\n")
    (tmp_path / "tcp_tw_reuse").write_text("1\n")
    (tmp_path / "tcp_timestamps").write_text("1\n")
    s = read_kernel_settings(tmp_path)
    assert s.port_range == (1024, 65535)
    assert s.ephemeral_ports == 64511
    assert s.tcp_tw_reuse == 1
    assert s.tcp_tw_reuse_delay_ms is None
    assert read_kernel_settings().ephemeral_ports > 0


def test_pressure_counts_open_and_recent_closes_in_the_window():
    log = _Log()
    p = PortPressure(_settings(port_range=(50000, 50009)), 0.5, 64, log)
    tc = p.target("192.0.2.1", "198.51.100.3", 80)
    for _ in range(4):
        p.opened(tc, now=100.0)
    assert p.pressure(tc, 100.0) == 0.4
    assert not log.named("egress_pressure_high")
    p.opened(tc, now=100.0)
    assert log.named("egress_pressure_high")[0]["open"] == 5
    tc.release(100.1, time_wait=True)
    tc.release(100.1, time_wait=False)
    assert tc.open == 3 and tc.ipc.open == 3
    assert tc.recent_closes(100.2) == 1
    assert tc.recent_closes(101.5) == 0  # window = tcp_tw_reuse_delay = 1 s
    snap = p.snapshot(100.2)
    row = snap.target("192.0.2.1", "198.51.100.3:80")
    assert row is not None and row.open == 3 and row.recent_closes == 1 and row.pressure == 0.4
    assert snap.ip("192.0.2.1").open == 3
    assert EgressSnapshot.from_dict(snap.to_dict()) == snap


def test_exhaustion_is_counted_always_and_logged_at_most_once_a_second():
    log = _Log()
    p = PortPressure(_settings(), 0.8, 64, log)
    tc = p.target("192.0.2.1", "198.51.100.3", 80)
    for i in range(5):
        p.exhausted(tc, now=10.0 + i * 0.1, attempts=4)
    p.exhausted(tc, now=11.05, attempts=4)
    assert tc.exhausted == 6 and tc.ipc.exhausted == 6
    lines = log.named("egress_exhausted")
    assert len(lines) == 2
    assert lines[1]["suppressed"] == 4 and lines[1]["exhausted_total"] == 6


def test_tracked_targets_stay_bounded_and_keep_the_hot_ones():
    p = PortPressure(_settings(), 0.8, 32, _Log())
    hot = p.target("192.0.2.1", "198.51.100.3", 80)
    for _ in range(10):
        p.opened(hot, now=1.0)
    for i in range(10_000):
        p.target("192.0.2.1", f"203.0.113.{i % 250}", 1000 + i)
    assert len(p.targets) <= 32
    assert p.targets[("192.0.2.1", "198.51.100.3", 80)] is hot
    assert p.snapshot(1.0).ip("192.0.2.1").open == 10


def test_egress_config_section():
    cfg = parse_config(
        tomllib.loads(
            "[egress]\npressure_threshold = 0.5\nmax_tracked_targets = 100\n"
            "[egress.retry]\ndelays = [0.01, 1.1]\n"
            '[[egress.map]]\ningress = "192.0.2.0/24"\nipv6 = "2001:db8::1"\n'
        ),
        "<t>",
    )
    assert cfg.egress.retry_delays == (0.01, 1.1)
    assert cfg.egress.mappings[0].ipv6 == "2001:db8::1"
    for text, key in [
        ("[egress.retry]\ndelays = [-1]\n", "egress.retry.delays[0]"),
        ('[[egress.map]]\ningress = "nope"\n', "egress.map[0].ingress"),
        ('[[egress.map]]\ningress = "192.0.2.1"\nipv4 = "2001:db8::1"\n', "egress.map[0].ipv4"),
        ('[[egress.map]]\ningress = "192.0.2.1"\n', "egress.map[0].ipv4"),
        ('[[egress.map]]\ningress = "192.0.2.1"\nipv4 = "192.0.2.9"\nx = 1\n', "egress.map[0].x"),
        ("[egress]\npressure_threshold = 2\n", "egress.pressure_threshold"),
        ("[egress]\nmax_tracked_targets = 1\n", "egress.max_tracked_targets"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_config(tomllib.loads(text), "<t>")
        assert str(err.value).startswith(f"{key}:"), str(err.value)
