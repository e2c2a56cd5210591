"""Benchmark target: accept, send one byte, wait for the client's EOF, close.

The peer (socksd or the direct baseline client) closes first, so its side of every
4-tuple ends in TIME_WAIT: the constraint the port-pressure benchmark measures.
Runs inside the benchmark's namespace: `python bench/_target.py HOST PORT`.
"""

from __future__ import annotations

import selectors
import socket
import sys


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                for _ in range(64):
                    try:
                        conn, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    try:
                        conn.send(b"!")
                    except OSError:
                        conn.close()
                        continue
                    sel.register(conn, selectors.EVENT_READ, conn)
            else:
                conn = key.data
                try:
                    data = conn.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(conn)
                    conn.close()


if __name__ == "__main__":
    main()
