"""One question to every live worker, their answers gathered into one response.

Owns: the queries of `socksd tunnels` and `socksd kick` while they are out: which
workers still owe an answer, the rows gathered so far, and answering the control
client once every worker answered, went away, or `ANSWER_TIMEOUT` passed.
Must not: talk to sockets (the supervisor sends the frames) or look at the rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

ANSWER_TIMEOUT = 5.0  # a worker that has not answered by then is named, not waited for
Waiter = Callable[[dict[str, Any]], None]


@dataclass
class _Query:
    op: str
    started: float
    waiting: set[int]  # worker pids
    waiter: Waiter
    rows: list[dict[str, Any]] = field(default_factory=list)


class Fanout:
    """The queries out to the workers, by id."""

    def __init__(self) -> None:
        self._next = 0
        self._out: dict[int, _Query] = {}

    def ask(
        self,
        op: str,
        fields: dict[str, Any],
        pids: Iterable[int],
        send: Callable[[int, dict[str, Any]], bool],
        waiter: Waiter,
        now: float,
    ) -> None:
        """Send `{"id", "op", **fields}` with `send(pid, body)` (False: that worker is
        gone) to each of `pids`; `waiter` gets the outcome once all answered."""
        self._next += 1
        query = _Query(op, now, set(), waiter)
        self._out[self._next] = query
        body = {"id": self._next, "op": op, **fields}
        for pid in pids:
            if send(pid, body):
                query.waiting.add(pid)
        self._finish(self._next)

    def answered(self, pid: int, body: dict[str, Any]) -> None:
        """Worker `pid` answered query `body["id"]` with `body["tunnels"]`."""
        qid = body.get("id", -1)
        query = self._out.get(qid)
        if query is None or pid not in query.waiting:
            return
        query.waiting.discard(pid)
        query.rows.extend(body.get("tunnels", []))
        self._finish(qid)

    def gone(self, pid: int) -> None:
        """Worker `pid` is gone: no query waits for it any more."""
        for qid, query in list(self._out.items()):
            if pid in query.waiting:
                query.waiting.discard(pid)
                self._finish(qid)

    def expire(self, now: float) -> None:
        """Answer the queries older than ANSWER_TIMEOUT with what they have."""
        for qid, query in list(self._out.items()):
            if now - query.started > ANSWER_TIMEOUT:
                self._finish(qid, timed_out=True)

    def _finish(self, qid: int, timed_out: bool = False) -> None:
        query = self._out[qid]
        if query.waiting and not timed_out:
            return
        del self._out[qid]
        rows = sorted(query.rows, key=lambda r: (r.get("user") or "", -r["age_s"], r["conn"]))
        query.waiter(
            {
                "ok": True,
                "op": query.op,
                "tunnels": rows,
                "count": len(rows),
                "workers_unanswered": sorted(query.waiting),
            }
        )
