"""Request driver of the retry and mirror tests, run inside the client pod
(`Mesh.exec`; test_deadline_envoy.py imports `send`).

Like tests/kernel_differential/driver.py (JSON list of requests in argv[1],
each naming its `vip` and `port`; results as a JSON list on stdout, a fresh
connection per request unless it names a kept-alive `conn`), but each request,
head and body, goes out in ONE write: the data path keeps a request for a
retry, and copies one for a shadow, only when it is whole in one write
(python's http.client writes a body separately). "served_by" is the app's
`x-*-served-by` response header (retry_app: x-k3-, mirror_app: x-k6-).
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time

KEEP: dict[str, socket.socket] = {}


def request_bytes(req: dict) -> bytes:  # type: ignore[type-arg]
    body = req["body"].encode() if req.get("body") else b""
    hdrs = dict(req["headers"])
    if body or req["method"] in ("POST", "PUT"):
        hdrs["content-length"] = str(len(body))
    head = f"{req['method']} {req['path']} HTTP/1.1\r\n" + \
        "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    return head.encode() + body


def served_by(r: http.client.HTTPResponse) -> str | None:
    return next((v for k, v in r.getheaders() if k.lower().endswith("-served-by")), None)


def send(req: dict) -> dict:  # type: ignore[type-arg]
    cid = req.get("conn")
    s = KEEP.get(cid) if cid else None
    if s is None:
        s = socket.create_connection((req["vip"], req["port"]), timeout=10)
        if cid:
            KEEP[cid] = s
    t0 = time.monotonic()
    try:
        s.sendall(request_bytes(req))
        r = http.client.HTTPResponse(s, method=req["method"])
        r.begin()
        data = r.read()
        return {"status": r.status, "body": data.decode(errors="replace"),
                "served_by": served_by(r), "secs": time.monotonic() - t0}
    except (OSError, http.client.HTTPException) as exc:
        return {"status": 0, "body": f"{type(exc).__name__}: {exc}", "served_by": None,
                "secs": time.monotonic() - t0}
    finally:
        if not cid:
            s.close()


def main() -> None:
    reqs = json.loads(open(sys.argv[1]).read())
    gap = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0
    out = []
    for r in reqs:
        out.append(send(r))
        time.sleep(gap)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
