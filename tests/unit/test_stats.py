"""The stats lines (worker side), their decoding and the aggregate (supervisor side)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import orjson

from socksd import stats
from socksd.metrics import render
from socksd.stats import (
    PIPE_LINE_MAX,
    EgressIpStats,
    EgressSnapshot,
    LineHeader,
    SupervisorFacts,
    TargetPressure,
    WorkerView,
)
from socksd.timewait import TimeWaitSample
from workers.counters import WorkerCounters

HEADER = LineHeader(worker=1, gen=2, pid=4242, seq=7, ts=1700000000.123)


def _counters(reasons: int = 0) -> WorkerCounters:
    c = WorkerCounters()
    c.accepted, c.tunnels_opened, c.tunnels_closed = 9, 7, 5
    c.bytes_up, c.bytes_down = 100, 2000
    c.open_tunnels = 2
    for i in range(reasons):
        c.handshake_failed(f"reason_{i:04d}_{'x' * 24}")
    c.refuse("client_denied")
    c.replied(0)
    c.replied(0)
    c.replied(5)
    return c


def _snapshot(ips: int = 2, targets: int = 1) -> EgressSnapshot:
    return EgressSnapshot(
        ephemeral_ports=28232,
        reuse_window_s=60.0,
        ips=tuple(
            EgressIpStats(
                ip=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
                open=i,
                attempted=i + 3,
                succeeded=i + 1,
                failed={"eaddrnotavail": 1, "econnrefused": i % 3},
                exhausted=i % 2,
                retries=2,
                rescued=1,
            )
            for i in range(ips)
        ),
        targets=tuple(
            TargetPressure(
                egress_ip="10.0.0.1",
                target=f"198.51.100.{i % 250}:{1000 + i}",
                open=i,
                recent_closes=3,
                exhausted=0,
                pressure=round((i + 3) / 28232, 4),
            )
            for i in range(targets)
        ),
    )


def _lines(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in data.splitlines()]


# -- the worker's lines ------------------------------------------------------------------


def test_stats_message_sums_the_egress_figures_and_derives_the_gauges():
    msg = stats.stats_message(_counters(reasons=1), _snapshot(ips=3), open_conns=5)
    c = msg["counters"]
    assert msg["kind"] == "stats"
    assert c["replies"] == {"0": 2, "5": 1}  # JSON keys: the code as text
    assert c["retries"] == 6 and c["rescued"] == 3 and c["exhausted"] == 1
    assert c["egress_errors"] == {"eaddrnotavail": 3, "econnrefused": 3}
    assert msg["gauges"] == {"open_tunnels": 2, "open_sessions": 3}
    assert "truncated" not in msg


def test_a_line_starts_with_the_header_and_ends_with_a_newline():
    line = stats.encode_line(HEADER, {"kind": "hello"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert list(orjson.loads(line)) == ["v", "worker", "gen", "pid", "seq", "ts", "kind"]
    assert orjson.loads(line) == {**HEADER.as_dict(), "kind": "hello"}


def test_a_stats_line_that_fits_is_not_truncated():
    body = stats.stats_message(_counters(reasons=3), _snapshot(), open_conns=2)
    line = stats.encode_line(HEADER, body)
    assert len(line) <= PIPE_LINE_MAX
    decoded = orjson.loads(line)
    assert "truncated" not in decoded
    assert len(decoded["counters"]["handshake_failures"]) == 3


def test_a_stats_line_over_pipe_line_max_drops_the_handshake_reasons():
    body = stats.stats_message(_counters(reasons=300), _snapshot(), open_conns=2)
    assert len(orjson.dumps(body)) > PIPE_LINE_MAX
    line = stats.encode_line(HEADER, body)
    assert len(line) <= PIPE_LINE_MAX  # one write(2), atomic
    decoded = orjson.loads(line)
    assert decoded["truncated"] is True
    assert "handshake_failures" not in decoded["counters"]
    assert decoded["counters"]["accepted"] == 9  # everything else is kept
    assert decoded["gauges"] == {"open_tunnels": 2, "open_sessions": 0}
    assert "handshake_failures" in body["counters"]  # the caller's body is not changed


def test_egress_lines_split_under_pipe_line_max_and_round_trip_through_feed():
    snapshot = _snapshot(ips=150, targets=40)
    lines = stats.encode_egress_lines(snapshot, HEADER)
    assert len(lines) > 1
    assert all(len(line) <= PIPE_LINE_MAX for line in lines)
    decoded = [orjson.loads(line) for line in lines]
    assert [d["part"] for d in decoded] == list(range(len(lines)))
    assert {d["parts"] for d in decoded} == {len(lines)}
    assert {d["seq"] for d in decoded} == {HEADER.seq}

    view = WorkerView(slot=1, gen=2, pid=4242, started=0.0, last_seen=0.0)
    data = b"".join(lines)
    for i in range(0, len(data), 1000):  # a pipe read may end anywhere in a line
        assert view.feed_bytes(data[i : i + 1000], now=5.0) == []
    assert view.egress_ips == [asdict(ip) for ip in snapshot.ips]
    assert view.egress_targets == [asdict(t) for t in snapshot.targets]
    assert view.ephemeral_ports == 28232
    assert view.last_seen == 5.0


def test_an_incomplete_flush_leaves_the_previous_egress_figures():
    view = WorkerView(slot=0, gen=1, pid=1, started=0.0, last_seen=0.0)
    first = stats.encode_egress_lines(_snapshot(ips=1), HEADER)
    view.feed_bytes(b"".join(first), now=1.0)
    second = stats.encode_egress_lines(
        _snapshot(ips=150), LineHeader(worker=1, gen=2, pid=4242, seq=8, ts=0.0)
    )
    view.feed_bytes(b"".join(second[:-1]), now=2.0)
    assert len(view.egress_ips) == 1
    view.feed_bytes(second[-1], now=3.0)
    assert len(view.egress_ips) == 150


def test_a_report_is_a_stats_line_then_the_egress_lines():
    lines = stats.encode_report(HEADER, _counters(), _snapshot(), open_conns=4)
    kinds = [orjson.loads(line)["kind"] for line in lines]
    assert kinds == ["stats", "egress"]
    view = WorkerView(slot=1, gen=2, pid=4242, started=0.0, last_seen=0.0)
    assert view.feed_bytes(b"".join(lines), now=1.0) == []
    assert view.counters["tunnels_opened"] == 7
    assert view.gauges == {"open_tunnels": 2, "open_sessions": 2}
    assert len(view.egress_ips) == 2


def test_feed_bytes_reports_a_bad_line_and_applies_the_others():
    view = WorkerView(slot=0, gen=1, pid=1, started=0.0, last_seen=0.0)
    hello = stats.encode_line(HEADER, {"kind": "hello"})
    errors = view.feed_bytes(b"{not json\n" + hello + b'{"kind": "sta', now=1.0)
    assert len(errors) == 1
    assert view.hello
    assert view.feed_bytes(b'ts", "counters": {"accepted": 1}}\n', now=2.0) == []
    assert view.counters == {"accepted": 1}


# -- the aggregate -----------------------------------------------------------------------


def _ip(ip: str, **figures: Any) -> dict[str, Any]:
    return {**asdict(EgressIpStats(ip=ip)), **figures}


def _target(ip: str, target: str, open_: int, recent: int, exhausted: int) -> dict[str, Any]:
    return asdict(TargetPressure(ip, target, open_, recent, exhausted, pressure=0.0))


def _view(slot: int, pid: int, counters: dict[str, Any], gauges: dict[str, Any]) -> WorkerView:
    return WorkerView(
        slot=slot,
        gen=2,
        pid=pid,
        started=900.0,
        last_seen=999.5,
        counters=counters,
        gauges=gauges,
        ephemeral_ports=10000,
    )


def _two_workers() -> list[WorkerView]:
    w0 = _view(0, 101, {"accepted": 3, "bytes_up": 10, "replies": {"0": 2}}, {})
    w0.gauges = {"open_tunnels": 1, "open_sessions": 0}
    w0.egress_ips = [
        _ip("192.0.2.2", open=1, attempted=4, succeeded=3, failed={"ECONNREFUSED": 1}),
        _ip("192.0.2.1", open=2, attempted=2, succeeded=2, udp_open=1),
    ]
    w0.egress_targets = [_target("192.0.2.1", "198.51.100.1:443", 2, 3, 0)]
    w1 = _view(1, 102, {"accepted": 4, "bytes_up": 20, "replies": {"0": 1, "5": 2}}, {})
    w1.gauges = {"open_tunnels": 2, "open_sessions": 1}
    w1.egress_ips = [
        _ip(
            "192.0.2.1",
            open=3,
            attempted=5,
            succeeded=4,
            failed={"ECONNREFUSED": 2},
            exhausted=1,
            retries=2,
            rescued=1,
        )
    ]
    w1.egress_targets = [
        _target("192.0.2.1", "198.51.100.1:443", 1, 0, 1),
        _target("192.0.2.2", "198.51.100.2:80", 5, 10, 0),
    ]
    return [w1, w0]


# What the supervisor's aggregate() answered for these inputs before it moved here
# (7701ae9), key order included: socksd stats --json, metrics and the table read it.
EXPECTED: dict[str, Any] = {
    "supervisor": {
        "pid": 4242,
        "generation": 2,
        "reloads": 3,
        "workers_wanted": 3,
        "uptime_s": 600.0,
        "config": "/etc/socksd/socksd.toml",
    },
    "total": {
        "counters": {"accepted": 17, "bytes_up": 35, "replies": {"0": 12, "1": 1, "5": 2}},
        "gauges": {"open_tunnels": 3, "open_sessions": 1},
    },
    "workers": [
        {
            "slot": 0,
            "gen": 2,
            "pid": 101,
            "alive": True,
            "last_seen_s": 0.5,
            "restarts": 0,
            "counters": {"accepted": 3, "bytes_up": 10, "replies": {"0": 2}},
            "gauges": {"open_tunnels": 1, "open_sessions": 0},
        },
        {
            "slot": 1,
            "gen": 2,
            "pid": 102,
            "alive": True,
            "last_seen_s": 0.5,
            "restarts": 1,
            "counters": {"accepted": 4, "bytes_up": 20, "replies": {"0": 1, "5": 2}},
            "gauges": {"open_tunnels": 2, "open_sessions": 1},
        },
        {
            "slot": 2,
            "gen": 2,
            "pid": None,
            "alive": False,
            "last_seen_s": None,
            "restarts": 4,
            "counters": {},
            "gauges": {},
        },
    ],
    "egress": {
        "ephemeral_ports": 10000,
        "ips": [
            {
                "ip": "192.0.2.1",
                "failed": {"ECONNREFUSED": 2},
                "open": 5,
                "attempted": 7,
                "succeeded": 6,
                "exhausted": 1,
                "retries": 2,
                "rescued": 1,
                "udp_open": 1,
            },
            {
                "ip": "192.0.2.2",
                "failed": {"ECONNREFUSED": 1},
                "open": 1,
                "attempted": 4,
                "succeeded": 3,
                "exhausted": 0,
                "retries": 0,
                "rescued": 0,
                "udp_open": 0,
            },
        ],
        "targets": [
            {
                "egress_ip": "192.0.2.2",
                "target": "198.51.100.2:80",
                "open": 5,
                "recent_closes": 10,
                "exhausted": 0,
                "pressure": 0.0015,
            },
            {
                "egress_ip": "192.0.2.1",
                "target": "198.51.100.1:443",
                "open": 3,
                "recent_closes": 3,
                "exhausted": 1,
                "pressure": 0.0006,
            },
        ],
        "time_wait": {
            "total": 6,
            "truncated": False,
            "by_pair": [
                {
                    "egress_ip": "192.0.2.1",
                    "target": "198.51.100.1:443",
                    "count": 5,
                    "pressure": 0.0005,
                }
            ],
        },
    },
}


def test_aggregate_of_two_workers_a_vacant_slot_and_retired_counters():
    agg = stats.aggregate(
        _two_workers(),
        retired={"accepted": 10, "bytes_up": 5, "replies": {"0": 9, "1": 1}},
        facts=SupervisorFacts(
            pid=4242,
            generation=2,
            reloads=3,
            started=400.0,
            config="/etc/socksd/socksd.toml",
            restarts=(0, 1, 4),
            vacant=(2,),
        ),
        time_wait=TimeWaitSample(total=6, by_pair=(("192.0.2.1", "198.51.100.1:443", 5),)),
        now=1000.0,
    )
    # The DNS summary (added after the move) follows the old keys; these workers
    # reported no DNS figures.
    assert agg.pop("dns") == {  # type: ignore[misc]
        "lookups": 0,
        "hits": 0,
        "misses": 0,
        "coalesced": 0,
        "stale": 0,
        "failures": {},
        "hit_ratio": None,
        "latency_p50_ms": None,
        "latency_p99_ms": None,
    }
    assert orjson.dumps(agg) == orjson.dumps(EXPECTED)  # same keys, same order
    assert 'socksd_worker_up{worker="2"} 0' in render(agg)


def test_aggregate_of_nothing_has_every_key():
    agg = stats.aggregate(
        [],
        retired={},
        facts=SupervisorFacts(
            pid=1, generation=1, reloads=0, started=0.0, config="x", restarts=(0,), vacant=(0,)
        ),
        time_wait=TimeWaitSample(total=0, by_pair=()),
        now=0.0,
    )
    assert agg["egress"] == {
        "ephemeral_ports": 1,  # never 0: pressures divide by it
        "ips": [],
        "targets": [],
        "time_wait": {"total": 0, "truncated": False, "by_pair": []},
    }
    assert agg["total"] == {"counters": {}, "gauges": {}}
    assert [w["alive"] for w in agg["workers"]] == [False]


def test_dns_summary_sums_and_reads_percentiles_off_the_histogram():
    dns = {
        "lookups": 10,
        "hits": 80,
        "misses": 10,
        "coalesced": 10,
        "stale": 1,
        "failures": {"dns_timeout": 1},
        "latency_ms": {"2": 50, "10": 45, "500": 4, "inf": 1},
    }
    summary = stats.dns_summary(dns)
    assert summary["hit_ratio"] == 0.8
    assert summary["latency_p50_ms"] == 2.0  # half of 100 lookups took <= 2 ms
    assert summary["latency_p99_ms"] == 500.0
    assert stats.latency_percentile({"inf": 3}, 0.5) is None  # above the last bound
    assert stats.latency_percentile({}, 0.5) is None
