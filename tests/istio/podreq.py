"""Bounded HTTP requests from inside a pod (run by tests/istio/test_mesh_bookinfo.py).

    python podreq.py URL COUNT [--method M] [--header K:V]...

Prints one JSON line per request: status and the x-l7fp-pod that answered.
Each request on a new connection, sent by http.client without a Connection
header: urllib sends `Connection: close`, which the kernel path hands to
Envoy (Envoy closes the client's connection after it; docs/fastpath.md
"Hop-by-hop request headers"), so no request would take the fast path.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
from urllib.parse import urlsplit


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("count", type=int)
    p.add_argument("--method", default="GET")
    p.add_argument("--header", action="append", default=[])
    args = p.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)
    url = urlsplit(args.url)
    target = url.path + (f"?{url.query}" if url.query else "") or "/"
    for _ in range(min(args.count, 1000)):
        conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=5)
        try:
            conn.request(args.method, target, headers=headers)
            r = conn.getresponse()
            status, pod, body = r.status, r.headers.get("x-l7fp-pod"), r.read()[:200]
        except OSError as e:
            status, pod, body = 0, None, str(e).encode()
        finally:
            conn.close()
        print(json.dumps({"status": status, "pod": pod, "body": body.decode(errors="replace")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
