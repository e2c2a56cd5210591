"""The session's phase table: every phase documented, reachable and able to end, and
`_transition()` allowing exactly what the table lists (no sockets: the session object
is built without its constructor)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from workers import session as session_module
from workers.session import _ALLOWED, _SWEPT, Phase, Session


def _reachable(start: Phase) -> set[Phase]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in _ALLOWED[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _session_in(phase: Phase) -> Session:
    s = Session.__new__(Session)
    s.phase = phase
    s._ctx = SimpleNamespace(handshakes={s})  # type: ignore[assignment]
    return s


def test_the_table_names_every_phase_once() -> None:
    assert set(_ALLOWED) == set(Phase)
    for targets in _ALLOWED.values():
        assert targets <= set(Phase)


def test_the_module_docstring_lists_every_phase() -> None:
    doc = session_module.__doc__ or ""
    for phase in Phase:
        assert f"\n    {phase.name} " in doc, phase.name


def test_every_phase_is_reachable_from_the_handshake() -> None:
    assert _reachable(Phase.HANDSHAKE) == set(Phase)


def test_every_phase_can_end() -> None:
    for phase in Phase:
        assert Phase.CLOSED in _reachable(phase), phase
    assert _ALLOWED[Phase.CLOSED] == frozenset()


def test_a_failure_reply_can_follow_every_live_phase() -> None:
    # Any phase before the hand-over may answer with a failure reply, then drain.
    live = set(Phase) - {Phase.RELAYING, Phase.DRAINING, Phase.CLOSED}
    for phase in live:
        assert Phase.DRAINING in _ALLOWED[phase], phase


@pytest.mark.parametrize("current", list(Phase))
@pytest.mark.parametrize("wanted", list(Phase))
def test_transition_allows_exactly_the_table(current: Phase, wanted: Phase) -> None:
    s = _session_in(current)
    if wanted in _ALLOWED[current]:
        s._transition(wanted)
        assert s.phase is wanted
        # Past its handshake and connect, a session leaves the deadline sweep.
        assert (s in s._ctx.handshakes) == (wanted in _SWEPT)
    else:
        with pytest.raises(RuntimeError, match="illegal transition"):
            s._transition(wanted)
        assert s.phase is current
