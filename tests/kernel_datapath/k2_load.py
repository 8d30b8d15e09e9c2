"""Bounded load client for the churn and kill tests (runs in the scoped cgroup).

Usage: k2_load.py HOST PORT MODE COUNT SECONDS
  MODE short: COUNT connections, one GET each (path cycles /fast/, /deny), then close.
  MODE keep:  one keep-alive connection, up to COUNT GETs of /fast/; on an error
              it counts the failure and reconnects (2 s timeout per request).
Stops at COUNT or SECONDS, whichever first; prints one JSON line of counts.
"""

from __future__ import annotations

import json
import socket
import sys
import time


def one(s: socket.socket, f, path: str) -> int:  # type: ignore[no-untyped-def]
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: svc\r\n\r\n".encode())
    line = f.readline()
    if not line:
        raise ConnectionError("eof")
    status = int(line.split()[1])
    n = 0
    while True:
        h = f.readline()
        if h in (b"\r\n", b""):
            break
        if h.lower().startswith(b"content-length:"):
            n = int(h.split(b":")[1])
    f.read(n)
    return status


def main() -> None:
    host, port, mode, count, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], \
        int(sys.argv[4]), float(sys.argv[5])
    end = time.time() + seconds
    statuses: dict[int, int] = {}
    errors = 0
    kinds: dict[str, int] = {}  # why requests failed: the test's message says which
    failed: list[dict[str, object]] = []  # the first few: which request, how long it waited
    done = 0
    s = f = None
    while done < count and time.time() < end:
        t0 = time.monotonic()
        path = "/deny" if (mode == "short" and done % 4 == 3) else f"/fast/{done}"
        try:
            if s is None:
                s = socket.create_connection((host, port), timeout=2)
                f = s.makefile("rb")
            st = one(s, f, path)
            statuses[st] = statuses.get(st, 0) + 1
        except OSError as e:
            errors += 1
            stage = "connect" if s is None else "request"
            kind = f"{stage}: {type(e).__name__} {e}"[:120]
            kinds[kind] = kinds.get(kind, 0) + 1
            if len(failed) < 5:
                failed.append({"path": path, "kind": kind, "secs": round(time.monotonic() - t0, 3)})
            if s is not None:
                s.close()
            s = None
        done += 1
        if mode == "short" and s is not None:
            s.close()
            s = None
    out = {"done": done, "errors": errors, "statuses": statuses}
    if kinds:
        out["error_kinds"] = kinds
        out["failed"] = failed
    print(json.dumps(out))


if __name__ == "__main__":
    main()
