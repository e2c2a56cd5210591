"""Benchmark load generator: open and close tunnels as fast as possible, bounded.

`python bench/_load.py MODE TARGET_HOST TARGET_PORT SECONDS THREADS SRC [PROXY_HOST PROXY_PORT]`

MODE "direct": connect from the egress IP SRC straight to the target with
IP_BIND_ADDRESS_NO_PORT: what the kernel allows one IP, with no proxy in the way.
MODE "socks": a SOCKS5 CONNECT through socksd; each client binds one of 64 source IPs
SRC.1-64 with NO_PORT, so the client side never runs out of quads before socksd's
egress does. Prints one JSON line: per-second
success counts and failures.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import struct
import sys
import threading
import time


def main() -> None:
    mode, thost, tport, seconds, threads, prefix = sys.argv[1:7]
    proxy = (sys.argv[7], int(sys.argv[8])) if mode == "socks" else None
    target = (thost, int(tport))
    seconds_f, n_threads = float(seconds), int(threads)
    start = time.monotonic()
    end = start + seconds_f
    buckets = [0] * (int(seconds_f) + 2)
    failures: dict[str, int] = {}
    lock = threading.Lock()
    request = (
        b"\x05\x01\x00\x01" + ipaddress.ip_address(thost).packed + struct.pack("!H", target[1])
    )

    def one(src: str) -> str | None:
        s = socket.socket()
        s.settimeout(5)
        try:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((src, 0))
            if proxy is None:
                s.connect(target)
            else:
                s.connect(proxy)
                s.sendall(b"\x05\x01\x00" + request)
                head = b""
                while len(head) < 12 and (chunk := s.recv(12 - len(head))):
                    head += chunk
                if len(head) < 12 or head[3] != 0:
                    return f"rep_{head[3] if len(head) > 3 else 'eof'}"
            got = s.recv(1)
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, "oserror").lower()
        finally:
            s.close()
        return None if got == b"!" else "no_byte"

    def worker(i: int) -> None:
        src = prefix if proxy is None else f"{prefix}.{1 + i % 64}"
        while (now := time.monotonic()) < end:
            failure = one(src)
            with lock:
                if failure is None:
                    buckets[int(now - start)] += 1
                else:
                    failures[failure] = failures.get(failure, 0) + 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    print(json.dumps({"per_second": buckets[: int(seconds_f)], "failures": failures}))


if __name__ == "__main__":
    main()
