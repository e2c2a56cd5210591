"""The forwarded-request codec (`socksd.forwarding`, `socksd.http`): pure bytes in and
out. The same exchanges through real sockets are in tests/integration/test_http_proxy.py."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socksd.codec import (
    NEED_DATA,
    CommandRequest,
    Greeting,
    Method,
    MethodSelection,
    ProtocolError,
)
from socksd.forwarding import Exchange, ExchangeFailed
from socksd.http import HttpServerConnection


def _codec(head: bytes) -> HttpServerConnection:
    """A codec that read `head` (an absolute-form request, no credentials) through to
    its CommandRequest, as the session drives it."""
    codec = HttpServerConnection(64 * 1024)
    assert isinstance(codec.receive(head), Greeting)
    assert codec.send(MethodSelection(Method.NO_AUTH)) == b""
    assert isinstance(codec.next_event(), CommandRequest)
    return codec


def _exchange(head: bytes) -> tuple[Exchange, bytes]:
    codec = _codec(head)
    assert codec.origin is not None
    exchange = Exchange(codec.take_parser())
    return exchange, exchange.start(codec.origin)


def test_the_origin_gets_origin_form_without_proxy_and_hop_by_hop_fields():
    _, sent = _exchange(
        b"GET http://example.com:8080/a?b=c HTTP/1.1\r\nHost: evil\r\n"
        b"Proxy-Authorization: Basic eDp5\r\nProxy-Connection: keep-alive\r\n"
        b"Connection: keep-alive, X-Private\r\nX-Private: 1\r\nKeep-Alive: 5\r\n"
        b"TE: trailers\r\nAccept: */*\r\n\r\n"
    )
    assert sent == (
        b"GET /a?b=c HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )


def test_a_chunked_body_goes_on_chunked_and_the_next_request_stays_buffered():
    exchange, sent = _exchange(
        b"POST http://o/p HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    )
    assert sent.endswith(b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n")
    more = exchange.from_client(b"0\r\n\r\nGET http://next/ HTTP/1.1\r\nHost: next\r\n\r\n")
    assert more == b"0\r\n\r\n" and exchange.request_done
    down = exchange.from_origin(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    assert down.startswith(b"HTTP/1.1 201 Created\r\n") and down.endswith(b"\r\n\r\nok")
    assert exchange.response_done and exchange.reusable and exchange.status == 201
    parser = exchange.next_cycle()
    event = parser.next_event()
    assert isinstance(event, h11.Request) and event.target == b"http://next/"


def test_a_close_delimited_response_is_chunked_for_the_client_and_hop_fields_dropped():
    exchange, _ = _exchange(b"GET http://o/ HTTP/1.1\r\nHost: o\r\n\r\n")
    down = exchange.from_origin(
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n"
        b"X-End: 2\r\n\r\nbody"
    )
    down += exchange.from_origin(b"")  # the origin closes: the body's end
    assert down == (
        b"HTTP/1.1 200 OK\r\nX-End: 2\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n"
    )
    assert exchange.reusable


def test_an_origin_sending_both_framings_is_read_chunked_and_sent_without_its_length():
    exchange, _ = _exchange(b"GET http://o/ HTTP/1.1\r\nHost: o\r\n\r\n")
    down = exchange.from_origin(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    )
    down += exchange.from_origin(b"5\r\nhello\r\n0\r\n\r\n")
    assert b"Content-Length" not in down and down.endswith(b"5\r\nhello\r\n0\r\n\r\n")


def test_a_request_with_both_framings_is_refused_and_1xx_never_reach_http10():
    codec = HttpServerConnection(64 * 1024)
    with pytest.raises(ProtocolError) as both:
        codec.receive(
            b"POST http://o/ HTTP/1.1\r\nHost: o\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
    assert both.value.reason == "http_conflicting_framing" and codec.status == 400
    exchange, _ = _exchange(b"POST http://o/ HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi")
    assert exchange.from_origin(b"HTTP/1.1 100 Continue\r\n\r\n") == b""
    assert exchange.from_origin(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").startswith(
        b"HTTP/1.1 200 OK\r\n"
    )


def test_an_answer_before_the_whole_body_closes_the_connection():
    exchange, _ = _exchange(b"POST http://o/ HTTP/1.1\r\nHost: o\r\nContent-Length: 9\r\n\r\n")
    down = exchange.from_origin(b"HTTP/1.1 413 Too Big\r\nContent-Length: 0\r\n\r\n")
    assert b"Connection: close\r\n" in down and exchange.response_done and not exchange.reusable


def test_a_draining_worker_says_connection_close():
    exchange, _ = _exchange(b"GET http://o/ HTTP/1.1\r\nHost: o\r\n\r\n")
    exchange.close_after = True
    down = exchange.from_origin(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert b"Connection: close\r\n" in down and not exchange.reusable


def test_failures_say_what_the_client_gets():
    exchange, _ = _exchange(b"GET http://o/ HTTP/1.1\r\nHost: o\r\n\r\n")
    with pytest.raises(ExchangeFailed) as bad:
        exchange.from_origin(b"HTTP/1.1 two hundred\r\n\r\n")
    assert (bad.value.reason, bad.value.status) == ("upstream_bad_response", 502)
    assert bad.value.answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    exchange, _ = _exchange(b"GET http://o/ HTTP/1.1\r\nHost: o\r\n\r\n")
    exchange.from_origin(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    with pytest.raises(ExchangeFailed) as cut:
        exchange.from_origin(b"")
    assert (cut.value.reason, cut.value.answer) == ("upstream_cut_response", b"")  # a reset
    exchange, _ = _exchange(b"POST http://o/ HTTP/1.1\r\nHost: o\r\nContent-Length: 9\r\n\r\nabc")
    with pytest.raises(ExchangeFailed) as gone:
        exchange.from_client(b"")
    assert gone.value.reason == "client_closed_mid_request" and not gone.value.answer
    exchange, _ = _exchange(
        b"POST http://o/ HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    with pytest.raises(ExchangeFailed) as framing:
        exchange.from_client(b"zz\r\nabc\r\n")
    assert (framing.value.reason, framing.value.status) == ("http_bad_request_body", 400)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=4))
def test_any_origin_bytes_give_bytes_or_exchange_failed(data, cuts):
    """Random responses, split anywhere: the codec answers with bytes or ExchangeFailed,
    never another exception (the worker's loop would log a crash)."""
    exchange, _ = _exchange(b"GET http://o/ HTTP/1.1\r\nHost: o\r\n\r\n")
    pieces = [
        data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True)
    ]
    try:
        for piece in [p for p in pieces if p] + [b""]:
            if exchange.response_done:
                break
            assert isinstance(exchange.from_origin(piece), bytes)
    except ExchangeFailed as failed:
        assert failed.status in (0, 502)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_client_body_bytes_give_bytes_or_exchange_failed(data):
    exchange, _ = _exchange(
        b"POST http://o/ HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    try:
        assert isinstance(exchange.from_client(data), bytes)
        exchange.from_client(b"")
    except ExchangeFailed as failed:
        assert failed.status in (0, 400)


def test_a_client_that_closes_inside_its_head_gets_no_answer_and_its_own_reason():
    codec = HttpServerConnection(64 * 1024)
    assert codec.receive(b"GET http://o/ HTTP/1.1\r\nHost: o\r\n") is NEED_DATA
    with pytest.raises(ProtocolError) as closed:
        codec.receive(b"")
    assert (closed.value.reason, closed.value.reply, codec.status) == (
        "client_closed_mid_head",
        b"",
        0,
    )
