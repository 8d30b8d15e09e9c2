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
    """argv: REQS.json. Requests go back to back (no pause)."""
    reqs = json.loads(open(sys.argv[1]).read())
    json.dump([send(r) for r in reqs], sys.stdout)


if __name__ == "__main__":
    main()
