"""The log line format: what the direct level methods write equals structlog's chain."""

from __future__ import annotations

import os
from collections.abc import Iterator

import orjson
import pytest

from socksd import logs


@pytest.fixture
def pipe() -> Iterator[int]:
    """Configure logging into a pipe; yield its read end."""
    read_fd, write_fd = os.pipe()
    writer = logs._WRITER
    saved_fd, saved_process = writer._fd, dict(logs._PROCESS)
    writer._fd = write_fd
    logs.configure("info")
    logs.bind_process(role="worker", worker=3, gen=1, pid=42)
    yield read_fd
    logs.set_buffered(False)
    writer._fd = saved_fd
    logs._PROCESS.clear()
    logs._PROCESS.update(saved_process)
    os.close(write_fd)
    os.close(read_fd)


def _read(fd: int) -> list[dict[str, object]]:
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 1 << 16)
    except BlockingIOError:
        return []
    return [orjson.loads(line) for line in data.splitlines()]


def test_direct_line_orders_time_level_event_then_context_fields_process(pipe):
    log = logs.get_logger(conn_id=7, client="127.0.0.1:5000")
    log.info("tunnel_closed", reply=0, bytes_up=64)
    (line,) = _read(pipe)
    assert list(line)[:3] == ["timestamp", "level", "event"]
    assert line["level"] == "info" and line["event"] == "tunnel_closed"
    assert list(line)[3:] == [
        "conn_id",
        "client",
        "reply",
        "bytes_up",
        "role",
        "worker",
        "gen",
        "pid",
    ]
    assert line["conn_id"] == 7 and line["worker"] == 3
    assert str(line["timestamp"]).endswith("Z")


def test_same_line_as_the_processor_chain(pipe):
    log = logs.get_logger(conn_id=1)
    log.warning("limit_reached", n=1, codes={5: 2})  # direct method
    log.log(30, "limit_reached", n=1, codes={5: 2})  # structlog's own path, same chain
    direct, chained = _read(pipe)
    direct.pop("timestamp")
    chained.pop("timestamp")
    assert direct == chained
    assert list(direct) == list(chained)
    assert direct["codes"] == {"5": 2}  # non-str keys rendered


def test_levels_below_the_configured_one_write_nothing(pipe):
    log = logs.get_logger()
    log.debug("tunnel_opened")
    assert _read(pipe) == []
    logs.configure("debug")
    logs.get_logger().debug("tunnel_opened")
    assert [line["event"] for line in _read(pipe)] == ["tunnel_opened"]


def test_exc_info_and_interpolation_take_structlog_path(pipe):
    log = logs.get_logger()
    try:
        int("boom")
    except ValueError as exc:
        log.error("session_crashed", exc_info=exc)
    log.info("worker %s ready", 2)
    crashed, ready = _read(pipe)
    assert "ValueError: invalid literal" in str(crashed["exception"])
    assert ready["event"] == "worker 2 ready"


def test_buffered_lines_of_one_tick_share_a_stamp_until_flush(pipe):
    log = logs.get_logger()
    logs.set_buffered(True)
    log.info("a")
    log.info("b")
    assert _read(pipe) == []  # held until the tick's flush
    logs.flush()
    a, b = _read(pipe)
    assert a["timestamp"] == b["timestamp"]
    assert logs._WRITER.stamp == ""  # the next tick stamps afresh


def test_bind_mapping_is_bind(pipe):
    context = {"conn_id": 9, "client": "127.0.0.1:1"}
    logs.get_logger(a=1).bind_mapping(context).info("x", n=2)
    logs.get_logger(a=1).bind(**context).info("x", n=2)
    context["late"] = True  # the bound logger keeps its own copy
    logs.get_logger(a=1).bind_mapping({}).info("x", n=2)
    by_mapping, by_bind, empty = _read(pipe)
    for line in (by_mapping, by_bind, empty):
        line.pop("timestamp")
    assert by_mapping == by_bind
    assert list(by_mapping) == list(by_bind)
    assert "late" not in by_mapping and "conn_id" not in empty
