"""Request driver run inside the client pod (`Mesh.exec`) by test_fastpath_onoff.py.

Reads a JSON list of requests from argv[1], sends each on a fresh TCP
connection (so each is decided on its own: a connection once handed to Envoy
stays there) or, when it names a `conn`, on that kept-alive connection, and prints a JSON list of results: status, response body and the
`x-k3-served-by` and `server` headers (a kernel reply has no `server`, an
Envoy one says `envoy`). The head and a small body go out in one write, as
the kernel takes only complete heads.
"""

from __future__ import annotations

import http.client
import json
import sys
import time

KEEP: dict[str, http.client.HTTPConnection] = {}  # "conn" id -> kept-alive connection


def send(req: dict) -> dict:  # type: ignore[type-arg]
    """One request: on a fresh connection, or on the kept-alive one named `conn`."""
    cid = req.get("conn")
    conn = KEEP.get(cid) if cid else None
    if conn is None:
        conn = http.client.HTTPConnection(req["vip"], req["port"], timeout=10)
        if cid:
            KEEP[cid] = conn
    try:
        body = req["body"].encode() if req.get("body") else None
        conn.putrequest(req["method"], req["path"], skip_host=True, skip_accept_encoding=True)
        hdrs = dict(req["headers"])
        if body is not None:
            hdrs["content-length"] = str(len(body))
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders(message_body=body)
        r = conn.getresponse()
        data = r.read()
        return {"status": r.status, "body": data.decode(errors="replace"),
                "served_by": r.getheader("x-k3-served-by"), "server": r.getheader("server")}
    except OSError as exc:  # a failed request is a result to compare, not a crash
        return {"status": 0, "body": f"{type(exc).__name__}: {exc}", "served_by": None}
    finally:
        if not cid:
            conn.close()


def main() -> None:
    """argv: REQS.json [GAP_MS]: GAP_MS between requests lets the fast-path agent
    refill its upstream pools (each closed client connection closes its bound
    upstream; back-to-back new connections would find the pools empty)."""
    reqs = json.loads(open(sys.argv[1]).read())
    gap = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0
    out = []
    for r in reqs:
        out.append(send(r))
        time.sleep(gap)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
