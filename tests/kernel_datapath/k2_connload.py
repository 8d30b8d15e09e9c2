"""Bounded connection-per-request load (run inside a client pod by test_pool_demand.py).

Usage: k2_connload.py HOST PORT THREADS COUNT SECONDS
Each of THREADS threads opens a new TCP connection, sends one GET in one
write, reads the whole response (Content-Length), closes, and starts again at
once (no pause), until COUNT requests in all or SECONDS have passed. Prints
one JSON line: done, errors, statuses, per-request start times are not kept.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time


def one(host: str, port: int, i: int) -> int:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(f"GET /c/{i} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        f = s.makefile("rb")
        line = f.readline()
        if not line:
            raise ConnectionError("eof before the status line")
        status = int(line.split()[1])
        n = 0
        while (h := f.readline()) not in (b"\r\n", b""):
            if h.lower().startswith(b"content-length:"):
                n = int(h.split(b":")[1])
        if len(f.read(n)) != n:
            raise ConnectionError("short body")
        return status


def main() -> None:
    host, port, threads, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
        int(sys.argv[4]), float(sys.argv[5])
    end = time.monotonic() + seconds
    lock = threading.Lock()
    state = {"next": 0, "errors": 0}
    statuses: dict[int, int] = {}

    def worker() -> None:
        while time.monotonic() < end:
            with lock:
                i = state["next"]
                if i >= count:
                    return
                state["next"] = i + 1
            try:
                st = one(host, port, i)
            except OSError:
                with lock:
                    state["errors"] += 1
                continue
            with lock:
                statuses[st] = statuses.get(st, 0) + 1

    t0 = time.monotonic()
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(json.dumps({"done": state["next"], "errors": state["errors"], "statuses": statuses,
                      "seconds": round(time.monotonic() - t0, 3)}))


if __name__ == "__main__":
    main()
