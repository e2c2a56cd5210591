"""The operator's view of a worker's live tunnels: `socksd tunnels` and `socksd kick`.

Owns: matching open tunnels and UDP associations against a query (user, ingress IP,
connection id), describing them, and closing the ones a kick names (`reason="kicked"`).
Must not: talk to the supervisor (workers.reload's channel handler does) or close a
connection other than through its own `close()`, which logs its line.

A connection is named `<worker pid>:<conn_id>`, the `pid` and `conn_id` of its log
lines: conn ids count per worker, the pid makes them unique on the host.
"""

from __future__ import annotations

import os
from typing import Any

import structlog

from socksd.usage import NO_USER
from workers.context import WorkerContext


def answer(ctx: WorkerContext, query: dict[str, Any]) -> list[dict[str, Any]]:
    """The tunnels `query` matches (`op` "tunnels"), or those it closed (`op` "kick").

    `query` keys, each optional: `user` (None or absent: any; "" the tunnels without a
    user), `ingress` (an IP), `conn` ("pid:conn_id"); a kick with none of them matches
    nothing.
    """
    pid = os.getpid()
    now = ctx.loop.now
    want_user = query.get("user")
    want_ingress = query.get("ingress")
    want_conn = query.get("conn")
    kick = query.get("op") == "kick"
    if kick and want_user is None and want_ingress is None and want_conn is None:
        return []
    rows = []
    for conn in list(ctx.open):
        describe = getattr(conn, "describe", None)
        if describe is None:
            continue  # a session still in its handshake: not a tunnel yet
        log, kind, started, up, down = describe()
        fields = structlog.get_context(log)
        row = {
            "conn": f"{pid}:{fields.get('conn_id')}",
            "kind": kind,
            "protocol": fields.get("protocol", "socks5"),
            "command": fields.get("command"),
            "user": fields.get("user"),
            "client": fields.get("client"),
            "ingress_ip": fields.get("ingress_ip"),
            "target": fields.get("target") if kind == "tcp" else "(udp)",
            "egress": fields.get("egress") or fields.get("udp_relay"),
            "age_s": round(now - started, 1),
            "bytes_up": up,
            "bytes_down": down,
        }
        user = row["user"] or NO_USER
        if want_user is not None and user != want_user:
            continue
        if want_ingress is not None and row["ingress_ip"] != want_ingress:
            continue
        if want_conn is not None and row["conn"] != want_conn:
            continue
        if kick:
            conn.close("kicked", abortive=True)
        rows.append(row)
    return rows
