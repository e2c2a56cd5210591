"""The per-customer books as pure logic: a worker's ledger, the supervisor's sums, the
Prometheus series and the control socket's query parsing (issue 16)."""

from __future__ import annotations

from socksd import metrics, usage
from socksd.control import _tunnel_query
from workers.accounting import Ledger


class _Conn:
    """Stands for a relay: a meter and the bytes it moved so far."""

    def __init__(self, ledger: Ledger, user: str | None, ingress: str, udp: bool = False):
        self.meter = ledger.open(user, ingress, 0.0, udp)
        self.now = (0, 0, 0, 0)

    def moved(self) -> tuple[int, int, int, int]:
        return self.now


def test_fold_then_close_gives_each_byte_once_to_the_user_and_the_ingress_ip():
    ledger = Ledger(interval=60.0)
    a = _Conn(ledger, "alice", "10.0.0.1")
    b = _Conn(ledger, None, "10.0.0.2", udp=True)
    first = ledger.report()
    assert first["users"]["alice"][:3] == [1, 0, 1] and first["users"][""][:3] == [0, 1, 1]
    a.now = (100, 2000, 0, 0)
    b.now = (30, 40, 3, 4)
    ledger.fold([a, b, object()])  # a session (no meter) is skipped
    ledger.fold([a, b])  # nothing moved since: counted once
    rows = ledger.report()
    assert rows["users"]["alice"][3:5] == [100, 2000]
    assert rows["users"][""][5:9] == [3, 4, 30, 40]
    assert rows["ingress"]["10.0.0.1"][3:5] == [100, 2000]
    assert ledger.report() == {"users": {}, "ingress": {}}, "nothing changed since"
    assert ledger.close(a.meter, (150, 2500, 0, 0)) == (150, 2500)  # no record yet
    final = ledger.report()["users"]["alice"]
    assert final[2:5] == [0, 150, 2500]


def test_records_give_the_bytes_since_the_previous_one_and_close_the_rest():
    ledger = Ledger(interval=1.0)
    meter = ledger.open("alice", "10.0.0.1", 0.0, False)
    assert meter.due == 1.0
    assert ledger.record(meter, (10, 20, 0, 0), 1.1) == {
        "record": 1,
        "bytes_up": 10,
        "bytes_down": 20,
    }
    assert meter.due == 2.0
    assert ledger.record(meter, (15, 20, 0, 0), 2.0)["bytes_up"] == 5
    assert ledger.close(meter, (16, 27, 0, 0)) == (1, 7)
    # A record far behind (a loop stall) is not followed by a burst of catch-ups.
    late = ledger.open("alice", "10.0.0.1", 0.0, True)
    fields = ledger.record(late, (1, 2, 3, 4), 10.0)
    assert fields["datagrams_up"] == 3 and late.due == 10.0


def test_refusals_count_per_reason_and_unknown_users_get_no_account():
    ledger = Ledger(interval=60.0)
    ledger.refused("destination_denied", "10.0.0.1", "alice")
    ledger.refused("destination_denied", "10.0.0.1", "alice")
    ledger.refused("auth_failed", "10.0.0.1", None)
    rows = ledger.report()
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
