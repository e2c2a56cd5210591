"""The per-customer books as pure logic: a worker's ledger, the supervisor's sums, the
Prometheus series and the control socket's query parsing (issue 16)."""

from __future__ import annotations

from socksd import metrics, usage
from socksd.control import _tunnel_query
from workers.accounting import Ledger


class _Conn:
    """Stands for an open relay or association: what it was admitted on, when it
    started, what it moved so far and its last record."""

    def __init__(self, user: str | None, ingress: str, udp: bool = False, started: float = 0.0):
        self.admitted = ("socks5", "192.0.2.1", ingress, user, None, None)
        self.udp = udp
        self.started = started
        self.recorded = None
        self.now = (0, 0, 0, 0)

    def moved(self) -> tuple[int, int, int, int]:
        return self.now


def test_a_report_is_the_closed_totals_plus_what_the_open_ones_moved():
    ledger = Ledger(interval=60.0)
    a = _Conn("alice", "10.0.0.1")
    b = _Conn(None, "10.0.0.2", udp=True)
    a.now = (100, 2000, 0, 0)
    b.now = (30, 40, 3, 4)
    rows = ledger.report([a, b, object()])  # a session (no `admitted`) is skipped
    assert rows["users"]["alice"][:5] == [1, 0, 1, 100, 2000]
    assert rows["users"][""][:9] == [0, 1, 1, 0, 0, 3, 4, 30, 40]
    assert rows["ingress"]["10.0.0.1"][3:5] == [100, 2000]
    assert ledger.report([]) == {"users": {}, "ingress": {}}, "nothing open, nothing closed"
    # a closes (no record: all its bytes are unreported, said by None), b stays open.
    assert ledger.closed(a.admitted, False, (150, 2500, 0, 0), None) is None
    rows = ledger.report([b])
    assert rows["users"]["alice"][:5] == [1, 0, 0, 150, 2500]
    assert rows["ingress"]["10.0.0.2"][:3] == [0, 1, 1]


def test_records_follow_the_interval_skip_idle_ones_and_close_gives_the_rest():
    ledger = Ledger(interval=1.0)
    conn = _Conn("alice", "10.0.0.1", started=5.0)
    assert not ledger.is_due(conn, 5.9) and ledger.is_due(conn, 6.0)
    fields, conn.recorded = ledger.record((10, 20, 0, 0), None, 5.0, 6.1, False)
    assert fields == {"record": 1, "bytes_up": 10, "bytes_down": 20}
    assert not ledger.is_due(conn, 6.9) and ledger.is_due(conn, 7.0)
    # An interval in which nothing moved: no line, the next one is due an interval on.
    fields, conn.recorded = ledger.record((10, 20, 0, 0), conn.recorded, 5.0, 7.0, False)
    assert fields is None and not ledger.is_due(conn, 7.9) and ledger.is_due(conn, 8.0)
    fields, conn.recorded = ledger.record((15, 20, 0, 0), conn.recorded, 5.0, 8.0, False)
    assert fields == {"record": 2, "bytes_up": 5, "bytes_down": 0}
    assert ledger.closed(conn.admitted, False, (16, 27, 0, 0), conn.recorded) == (1, 7)
    # A reload's longer interval applies from the next record on.
    ledger.interval = 10.0
    assert not ledger.is_due(conn, 17.9) and ledger.is_due(conn, 18.0)
    # After a stall of the loop, one record covers the time missed; counting restarts.
    fields, recorded = ledger.record((1, 2, 3, 4), None, 0.0, 95.0, True)
    assert fields == {
        "record": 1,
        "bytes_up": 1,
        "bytes_down": 2,
        "datagrams_up": 3,
        "datagrams_down": 4,
    }
    assert recorded[5] == 95.0
    assert ledger.closed(conn.admitted, True, (5, 6, 7, 8), recorded) == (4, 4, 4, 4)
    idle = _Conn("bob", "10.0.0.1")
    _, idle.recorded = ledger.record((0, 0, 0, 0), None, 0.0, 10.0, False)
    assert ledger.closed(idle.admitted, False, (3, 3, 0, 0), idle.recorded) is None


def test_refusals_count_per_reason_and_unknown_users_get_no_account():
    ledger = Ledger(interval=60.0)
    ledger.refused("destination_denied", "10.0.0.1", "alice")
    ledger.refused("destination_denied", "10.0.0.1", "alice")
    ledger.refused("auth_failed", "10.0.0.1", None)
    rows = ledger.report([])
    assert rows["users"] == {"alice": [0] * 9 + [{"destination_denied": 2}]}
    assert rows["ingress"]["10.0.0.1"][9] == {"destination_denied": 2, "auth_failed": 1}


def _row(up: int, down: int, open_: int = 0, refused: dict[str, int] | None = None) -> list:
    return [1, 0, open_, up, down, 0, 0, 0, 0, refused or {}]


def test_the_book_replaces_a_workers_rows_and_keeps_those_of_gone_workers():
    book = usage.UsageBook()
    book.feed(101, {"users": {"alice": _row(10, 20, 1)}, "ingress": {}})
    book.feed(101, {"users": {"alice": _row(15, 25, 1)}, "ingress": {}})  # cumulative
    book.feed(202, {"users": {"alice": _row(1, 2, 1, {"x": 1}), "bob": _row(5, 5)}})
    totals = book.totals("users")
    assert totals["alice"] == [2, 0, 2, 16, 27, 0, 0, 0, 0, {"x": 1}]
    book.retire(101)  # killed: its last figures stay, its open tunnels do not
    book.feed(303, {"users": {"alice": _row(100, 0, 1)}})
    totals = book.totals("users")
    assert totals["alice"][2:5] == [2, 116, 27]
    assert list(book.seen_users) == ["alice", "bob"]
    rows = usage.user_rows(totals)
    assert [r["user"] for r in rows] == ["alice", "bob"] and rows[0]["bytes_total"] == 143
    assert usage.summed([totals["alice"], totals["bob"]])[3] == 121


def test_ingress_rows_carry_the_port_pressure_of_their_egress_ip():
    egress = {
        "ips": [{"ip": "192.0.2.9", "open": 7, "exhausted": 2, "retries": 3}],
        "targets": [
            {"egress_ip": "192.0.2.9", "target": "a:443", "pressure": 0.5},
            {"egress_ip": "192.0.2.9", "target": "b:443", "pressure": 0.1},
        ],
        "time_wait": {"by_pair": [{"egress_ip": "192.0.2.9", "count": 40}]},
    }
    rows = usage.ingress_rows({"10.0.0.1": _row(1, 2)}, {"10.0.0.1": "192.0.2.9"}, egress)
    assert rows[0]["egress"] == {
        "ip": "192.0.2.9",
        "open": 7,
        "exhausted": 2,
        "retries": 3,
        "time_wait": 40,
        "hottest_target": "a:443",
        "pressure": 0.5,
    }
    assert "10.0.0.1" in usage.format_ingress(rows)


def test_per_user_families_only_when_given():
    plain = metrics.render({})
    assert "socksd_user_" not in plain and "socksd_ingress_" not in plain
    rows = usage.user_rows({"alice": _row(3, 4, 1, {"user_limit": 2})})
    text = metrics.render({}, {"users": rows})
    assert 'socksd_user_bytes_total{user="alice",direction="up"} 3' in text
    assert 'socksd_user_refused_total{user="alice",reason="user_limit"} 2' in text
    assert "socksd_ingress_" not in text


def test_tunnel_queries_are_checked_before_any_worker_is_asked():
    assert _tunnel_query(b'{"user": "alice"}') == ({"user": "alice"}, "")
    assert _tunnel_query(b"") == ({}, "")
    assert _tunnel_query(b'{"conn": "12:7"}') == ({"conn": "12:7"}, "")
    assert "PID:CONN_ID" in _tunnel_query(b'{"conn": "12"}')[1]
    assert "unknown key" in _tunnel_query(b'{"name": "x"}')[1]
    assert "string" in _tunnel_query(b'{"user": 3}')[1]
    assert "JSON" in _tunnel_query(b"{")[1]


def test_the_channel_flushes_a_frame_larger_than_the_socket_buffer_and_reads_it_at_eof():
    import threading

    from socksd.channel import USAGE, Channel

    ours, theirs = Channel.pair()
    worker, supervisor = Channel(ours), Channel(theirs)
    body = {"users": {f"user{i}": [i] * 9 + [{}] for i in range(50_000)}, "ingress": {}}
    worker.send(USAGE, body)
    got: list = []

    def read_slowly() -> None:
        import select
        import time

        while True:
            select.select([supervisor.sock], [], [], 5)
            time.sleep(0.01)
            frames = supervisor.read()
            if frames is None:
                return
            got.extend(frames)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    assert worker.flush_blocking(10.0)
    worker.close()  # the worker exits: the frame and the EOF arrive together
    reader.join(10)
    assert len(got) == 1 and got[0].kind == USAGE and got[0].body == body
    supervisor.close()


def test_the_accounting_settings_are_checked():
    import pytest

    from socksd.config import parse_config
    from socksd.errors import ConfigError

    base = {"listen": ["127.0.0.1:1080"]}
    config = parse_config({**base, "accounting": {"interval": 5}}, "t")
    assert config.accounting.interval == 5.0 and config.accounting.enabled
    with pytest.raises(ConfigError, match=r"accounting\.interval: must be >= 0\.5"):
        parse_config({**base, "accounting": {"interval": 0.01}}, "t")
    with pytest.raises(ConfigError, match=r"metrics\.max_users: must be an integer"):
        parse_config({**base, "metrics": {"max_users": -1}}, "t")
    with pytest.raises(ConfigError, match=r"metrics\.per_user: must be true or false"):
        parse_config({**base, "metrics": {"per_user": "yes"}}, "t")
