"""The SOCKS4 codec's transition table: every step it takes is listed, and no other.

No sockets: requests are built by hand, as in test_socks4_udp.py.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TypeAlias

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import socksd.socks4 as socks4_module
from socksd.codec import (
    AuthStatus,
    CommandReply,
    LocalProtocolError,
    MethodSelection,
    ProtocolError,
    Reply,
    ServerMessage,
    State,
)
from socksd.socks4 import Socks4ServerConnection

TABLE = socks4_module._TRANSITIONS
CONNECT = bytes([4, 1]) + struct.pack(">H", 80) + bytes([10, 0, 0, 1]) + b"alice\x00"
BIND = bytes([4, 2]) + struct.pack(">H", 21) + bytes([192, 0, 2, 9]) + b"\x00"
SUCCESS = CommandReply(Reply.SUCCEEDED, "192.0.2.1", 4242)
INTERIM = CommandReply(Reply.SUCCEEDED, "192.0.2.1", 5000, interim=True)
REFUSAL = CommandReply(Reply.NOT_ALLOWED)
SMALL = 64  # max_buffer for the overflow paths

Action: TypeAlias = Callable[[Socks4ServerConnection], object]


def _feed(data: bytes) -> Action:
    return lambda c: c.receive_data(data)


def _receive(data: bytes) -> Action:
    return lambda c: c.receive(data)


def _send(message: ServerMessage) -> Action:
    return lambda c: c.send(message)


def _next(c: Socks4ServerConnection) -> object:
    return c.next_event()


def _success(c: Socks4ServerConnection) -> object:
    return c.send_success("192.0.2.1", 4242)


# Every path the codec has, as the actions that walk it: each step taken must be listed.
PATHS: dict[str, list[Action]] = {
    "connect": [_feed(CONNECT), _next, _send(SUCCESS)],
    "connect_fused": [_receive(CONNECT), _success],
    "bind": [_receive(BIND), _send(INTERIM), _send(SUCCESS)],
    "bind_refused_after_interim": [_receive(BIND), _send(INTERIM), _send(REFUSAL)],
    "refused": [_receive(CONNECT), _send(REFUSAL)],
    "eof_before_request": [_feed(CONNECT[:5]), _feed(b""), _next],
    "eof_fused": [_receive(b"")],
    "bad_version": [_receive(b"\x05\x01")],
    "unknown_command": [_receive(b"\x04\x03")],
    "overflow_in_request": [_feed(b"\x04" * (SMALL + 1))],
    "overflow_awaiting_reply": [_receive(CONNECT), _feed(b"x" * (SMALL + 1))],
    "overflow_while_relaying": [_receive(CONNECT), _success, _feed(b"x" * (SMALL + 1))],
    "overflow_between_bind_replies": [_receive(BIND), _send(INTERIM), _feed(b"x" * (SMALL + 1))],
}


def _walk(actions: list[Action]) -> list[tuple[State, State]]:
    """Run `actions` on a fresh codec; every step it takes, in order.

    Steps are recorded by spying on `_transition()`, and each call's outcome is checked
    against them: a state change that bypassed `_transition()` fails here.
    """
    c = Socks4ServerConnection(max_buffer=SMALL)
    steps: list[tuple[State, State]] = []
    original = Socks4ServerConnection._transition

    def spy(self: Socks4ServerConnection, new_state: State) -> None:
        steps.append((self.state, new_state))
        original(self, new_state)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Socks4ServerConnection, "_transition", spy)
        for action in actions:
            before, taken = c.state, len(steps)
            try:
                action(c)
            except ProtocolError:
                pass
            expected = steps[-1][1] if len(steps) > taken else before
            assert c.state is expected, ("a step bypassed _transition()", before, c.state)
    return steps


def _listed() -> set[tuple[State, State]]:
    return {(state, after) for state, afters in TABLE.items() for after in afters}


def test_the_table_covers_exactly_the_socks4_states() -> None:
    states = {State.REQUEST, State.SEND_REPLY, State.RELAYING, State.CLOSED, State.ERROR}
    assert set(TABLE) == states
    for afters in TABLE.values():
        assert afters <= states
    # CLOSED and ERROR are final; RELAYING's one exit is a buffer overflow.
    assert {s for s, afters in TABLE.items() if not afters} == {State.CLOSED, State.ERROR}
    assert TABLE[State.RELAYING] == {State.ERROR}


def test_a_fresh_codec_starts_in_request() -> None:
    assert Socks4ServerConnection().state is State.REQUEST


@pytest.mark.parametrize("path", PATHS)
def test_every_step_of_every_path_is_listed(path: str) -> None:
    steps = _walk(PATHS[path])
    assert steps, path
    for before, after in steps:
        assert after in TABLE[before], (path, before, after)


def test_every_listed_step_is_taken_by_some_path() -> None:
    taken = {step for path in PATHS.values() for step in _walk(path)}
    assert taken == _listed()


@pytest.mark.parametrize("terminal", [s for s, afters in TABLE.items() if not afters])
def test_a_terminal_state_has_no_exits(terminal: State) -> None:
    assert terminal in (State.CLOSED, State.ERROR)
    for path, actions in PATHS.items():
        steps = _walk(actions)
        assert all(before is not terminal for before, _ in steps), path


def _codec_in(state: State) -> Socks4ServerConnection:
    c = Socks4ServerConnection(max_buffer=SMALL)
    if state is State.ERROR:
        with pytest.raises(ProtocolError):
            c.receive(b"\x05")
    elif state is not State.REQUEST:
        c.receive(CONNECT)
        if state is State.RELAYING:
            c.send(SUCCESS)
        elif state is State.CLOSED:
            c.send(REFUSAL)
    assert c.state is state
    return c


ALL_CALLS: dict[str, Action] = {
    "receive_data": _feed(CONNECT),
    "receive_data_eof": _feed(b""),
    "next_event": _next,
    "receive": _receive(CONNECT),
    "send_success": _success,
    "send_reply": _send(SUCCESS),
    "send_interim": _send(INTERIM),
    "send_refusal": _send(REFUSAL),
}


@pytest.mark.parametrize("terminal", [State.CLOSED, State.ERROR])
@pytest.mark.parametrize("call", ALL_CALLS)
def test_no_call_leaves_a_terminal_state(terminal: State, call: str) -> None:
    c = _codec_in(terminal)
    try:
        ALL_CALLS[call](c)
    except (ProtocolError, LocalProtocolError):
        pass
    assert c.state is terminal


ILLEGAL_SENDS: list[tuple[State, ServerMessage]] = [
    (state, message)
    for state in TABLE
    if state is not State.SEND_REPLY
    for message in (SUCCESS, INTERIM, REFUSAL)
] + [
    (state, message)
    for state in TABLE
    for message in (
        MethodSelection(0),
        AuthStatus(True),
        AuthStatus(False),
        CommandReply(Reply.GENERAL_FAILURE, interim=True),
    )
]


@pytest.mark.parametrize(("state", "message"), ILLEGAL_SENDS)
def test_an_illegal_send_raises_and_changes_nothing(state: State, message: ServerMessage) -> None:
    c = _codec_in(state)
    trailing = c.trailing_data
    with pytest.raises(LocalProtocolError):
        c.send(message)
    assert c.state is state
    assert c.trailing_data == trailing


@pytest.mark.parametrize("state", [s for s in TABLE if s is not State.SEND_REPLY])
def test_send_success_out_of_turn_raises_and_changes_nothing(state: State) -> None:
    c = _codec_in(state)
    with pytest.raises(LocalProtocolError):
        c.send_success("192.0.2.1", 4242)
    assert c.state is state


@pytest.mark.parametrize("state", list(TABLE))
def test_transition_refuses_every_unlisted_step(state: State) -> None:
    for target in State:
        c = _codec_in(state)
        if target in TABLE[state]:
            c._transition(target)
            assert c.state is target
        else:
            with pytest.raises(LocalProtocolError):
                c._transition(target)
            assert c.state is state


def test_codec_is_slotted() -> None:
    c = Socks4ServerConnection()
    assert not hasattr(c, "__dict__")
    with pytest.raises(AttributeError):
        c.undeclared = 1  # type: ignore[attr-defined]


# Any sequence of calls, any input: the codec only ever takes listed steps.
_MESSAGES: list[ServerMessage] = [SUCCESS, INTERIM, REFUSAL, MethodSelection(0)]
_ACTIONS = st.one_of(
    st.binary(max_size=40).map(_feed),
    st.binary(max_size=40).map(_receive),
    st.just(_feed(b"")),
    st.just(_next),
    st.just(_success),
    st.sampled_from(_MESSAGES).map(_send),
    st.sampled_from([CONNECT, BIND, CONNECT[:6], BIND + b"early"]).map(_receive),
)


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(_ACTIONS, max_size=12))
def test_any_calls_take_only_listed_steps(actions: list[Action]) -> None:
    def tolerant(action: Action) -> Action:
        def run(c: Socks4ServerConnection) -> object:
            try:
                return action(c)
            except LocalProtocolError:
                return None  # a call out of turn: refused, and checked to change nothing

        return run

    for before, after in _walk([tolerant(a) for a in actions]):
        assert after in TABLE[before], (before, after)
