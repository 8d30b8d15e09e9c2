"""Bounded HTTP requests from inside a pod (run by tests/istio/test_mesh_bookinfo.py).

    python podreq.py URL COUNT [--method M] [--header K:V]...

Prints one JSON line per request: status and the x-l7fp-pod that answered.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("count", type=int)
    p.add_argument("--method", default="GET")
    p.add_argument("--header", action="append", default=[])
    args = p.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)
    for _ in range(min(args.count, 1000)):
        req = urllib.request.Request(args.url, method=args.method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                status, pod, body = r.status, r.headers.get("x-l7fp-pod"), r.read()[:200]
        except urllib.error.HTTPError as e:
            status, pod, body = e.code, e.headers.get("x-l7fp-pod"), e.read()[:200]
        except OSError as e:
            status, pod, body = 0, None, str(e).encode()
        print(json.dumps({"status": status, "pod": pod, "body": body.decode(errors="replace")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
