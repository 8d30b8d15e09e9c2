"""Bounded HTTP client run inside a pod by the mesh tests (`mesh exec ... python podclient.py`).

Sends GET requests over one keep-alive connection (reconnecting on error) for
at most --seconds or --count requests, and prints one JSON line per request:
wall-clock time, status (0 for a transport error) and x-l7fp-service.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("path")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--count", type=int, default=100000)
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--rate", type=float, default=0.0, help="requests per second (0: closed loop)")
    args = p.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)
    end = time.time() + args.seconds
    conn = http.client.HTTPConnection(args.host, args.port, timeout=5)
    gap = 1.0 / args.rate if args.rate else 0.0
    for _ in range(args.count):
        if time.time() > end:
            break
        if gap:
            time.sleep(gap)
        t = time.time()
        try:
            conn.request("GET", args.path, headers=headers)
            r = conn.getresponse()
            r.read()
            status, by = r.status, r.getheader("x-l7fp-service")
        except (OSError, http.client.HTTPException) as exc:
            status, by = 0, type(exc).__name__
            conn.close()
            conn = http.client.HTTPConnection(args.host, args.port, timeout=5)
        print(json.dumps({"t": t, "status": status, "by": by}))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
