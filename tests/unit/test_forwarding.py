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


def _codec(head: bytes, fast: bool = False) -> HttpServerConnection:
    """A codec that read `head` (an absolute-form request, no credentials) through to
    its CommandRequest, as the session drives it: with h11, or (`fast`) as one read,
    which the fast path takes when it can."""
    codec = HttpServerConnection(64 * 1024)
    if fast:
        assert isinstance(codec.receive(head), Greeting)
    else:  # in two reads: the fast path takes a head only whole
        assert codec.receive(head[:1]) is NEED_DATA
        assert isinstance(codec.receive(head[1:]), Greeting)
    assert codec.send(MethodSelection(Method.NO_AUTH)) == b""
    assert isinstance(codec.next_event(), CommandRequest)
    return codec


def _exchange(head: bytes, fast: bool = False) -> tuple[Exchange, bytes]:
    codec = _codec(head, fast)
    assert codec.forwards
    exchange = Exchange(*codec.take())
    return exchange, exchange.start()


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
    parser, ahead = exchange.next_cycle()
    assert parser is not None and ahead == b""
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


# -- the fast path gives what h11 gives ---------------------------------------------------

_FIELDS = st.sampled_from(
    [
        b"Accept: */*",
        b"User-Agent: curl/8.5.0",
        b"Proxy-Authorization: Basic YTpi",
        b"Proxy-Connection: keep-alive",
        b"Connection: keep-alive",
        b"Connection: close",
        b"Connection: keep-alive, X-Hop",
        b"X-Hop: 1",
        b"Keep-Alive: timeout=5",
        b"TE: trailers",
        b"Upgrade: h2c",
        b"Cookie: a=b; c=d",
        b"X-Empty:",
        b"x-lower:  padded\t",
    ]
)
_TARGETS = st.sampled_from(
    [
        b"http://example.com/",
        b"http://example.com",
        b"http://example.com:8080/a/b?c=d&e",
        b"http://user@example.com/x",
        b"http://example.com?q",
        b"http://example.com/a?",
        b"http://[2001:db8::1]:81/v6",
        b"http://192.0.2.1/%20x",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"GET", b"HEAD"]), _TARGETS, st.lists(_FIELDS, max_size=6))
def test_the_fast_path_sends_the_origin_what_h11_sends(method, target, fields):
    head = b"%s %s HTTP/1.1\r\nHost: h\r\n%s\r\n" % (
        method,
        target,
        b"".join(f + b"\r\n" for f in fields),
    )
    fast_codec = _codec(head, fast=True)
    assert fast_codec.fast is not None, "the fast path took it"
    slow, fast = _exchange(head), _exchange(head, fast=True)
    assert fast[1] == slow[1]


_ANSWER_FIELDS = st.sampled_from(
    [
        b"Server: x",
        b"Connection: keep-alive",
        b"Connection: close",
        b"Connection: X-Hop",
        b"X-Hop: 1",
        b"Keep-Alive: timeout=5",
        b"Proxy-Authenticate: Basic",
        b"Set-Cookie: a=b",
        b"Content-Type: text/plain",
        b"X-Blank:",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from([b"GET", b"HEAD"]),
    st.sampled_from([b"", b"Connection: close\r\n"]),
    st.sampled_from(
        [b"HTTP/1.1 200 OK", b"HTTP/1.0 404 Not Found", b"HTTP/1.1 302 ", b"HTTP/1.1 500"]
    ),
    st.lists(_ANSWER_FIELDS, max_size=5),
    st.binary(max_size=300),
    st.booleans(),
    st.lists(st.integers(1, 400), max_size=3),
)
def test_the_fast_path_gives_the_client_what_h11_gives(
    method, close, status, fields, body, draining, cuts
):
    """Same answer bytes, same status, same keep-alive verdict, however the answer is
    split into reads."""
    head = b"%s http://o/ HTTP/1.1\r\nHost: o\r\n%s\r\n" % (method, close)
    answer = b"%s\r\n%sContent-Length: %d\r\n\r\n%s" % (
        status,
        b"".join(f + b"\r\n" for f in fields),
        len(body),
        body,
    )
    results = []
    for fast in (False, True):
        exchange, _ = _exchange(head, fast)
        exchange.close_after = draining
        out = b""
        points = sorted({c for c in cuts if c < len(answer)})
        for a, b in zip([0, *points], [*points, len(answer)], strict=True):
            if not exchange.response_done:
                out += exchange.from_origin(answer[a:b])
        results.append((out, exchange.status, exchange.response_done, exchange.reusable))
    assert results[0] == results[1]


def test_an_answer_the_fast_path_does_not_frame_goes_to_h11_as_if_from_the_start():
    head = b"GET http://o/ HTTP/1.1\r\nHost: o\r\n\r\n"
    for answer in (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",  # bare LF
    ):
        outs = []
        for fast in (False, True):
            exchange, _ = _exchange(head, fast)
            out = exchange.from_origin(answer)
            outs.append((out, exchange.status, exchange.reusable))
        assert outs[0] == outs[1], answer
    # Ended by a close: the client gets it chunked either way, then the EOF ends it.
    for fast in (False, True):
        exchange, _ = _exchange(head, fast)
        out = exchange.from_origin(b"HTTP/1.0 200 OK\r\n\r\nbody") + exchange.from_origin(b"")
        assert out.endswith(b"4\r\nbody\r\n0\r\n\r\n") and exchange.reusable


def test_the_fast_path_keeps_what_the_client_sends_ahead_for_its_next_request():
    exchange, _ = _exchange(b"GET http://o/ HTTP/1.1\r\nHost: o\r\n\r\n", fast=True)
    assert exchange.request_done
    exchange.from_client(b"GET http://next/")  # before the answer's head ...
    exchange.from_origin(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n")
    exchange.from_client(b" HTTP/1.1\r\n")  # ... and after
    assert exchange.ahead == 27
    assert exchange.from_origin(b"!") == b"!" and exchange.reusable
    parser, ahead = exchange.next_cycle()
    assert parser is None and ahead == b"GET http://next/ HTTP/1.1\r\n"
    codec = HttpServerConnection(64 * 1024, None, ahead)
    assert codec.buffered and codec.receive(b"Host: next\r\n\r\n") is not NEED_DATA


def test_review_cases_the_fast_path_hands_to_h11_or_matches_it():
    head = b"GET http://o/ HTTP/1.1\r\nHost: o\r\n\r\n"
    for answer in (
        # The length is named hop-by-hop: h11 chunks the body (the client must not get
        # a body without framing on a kept-alive connection).
        b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\r\nok",  # LF CR LF ends a head for h11
        b"HTTP/1.1 200 OK\r\nContent-Length: 123456789012345678901\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
    ):
        outs = []
        for fast in (False, True):
            exchange, _ = _exchange(head, fast)
            try:
                outs.append((exchange.from_origin(answer), exchange.status, exchange.reusable))
            except ExchangeFailed as failed:
                outs.append((failed.reason, failed.status, None))
        assert outs[0] == outs[1], answer[:60]


def test_bytes_sent_while_the_request_was_admitted_stay_the_next_request():
    codec = _codec(b"GET http://o/ HTTP/1.1\r\nHost: o\r\n\r\n", fast=True)
    codec.receive_data(b"GET http://n/ HTTP/1.1\r\nHost: n\r\n\r\n")  # while logging in
    exchange = Exchange(*codec.take())
    exchange.start()
    exchange.from_origin(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert exchange.ahead == 35 and exchange.next_cycle() == (
        None,
        b"GET http://n/ HTTP/1.1\r\nHost: n\r\n\r\n",
    )


def test_brackets_only_around_an_ipv6_host_take_the_fast_path():
    for target, fast in (
        (b"http://[2001:db8::1]:81/", True),
        (b"http://[1.2.3.4]/", False),
        (b"http://u[x]@host/", False),
        (b"http://a]@host/", False),
        (b"http://[::1/", False),
    ):
        codec = HttpServerConnection(64 * 1024)
        try:
            codec.receive(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % target)
        except ProtocolError as refused:
            assert refused.reply.startswith(b"HTTP/1.1 400 ")  # h11's path judged it
        assert (codec.fast is not None) == fast, target
