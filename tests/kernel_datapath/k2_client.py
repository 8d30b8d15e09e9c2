"""Raw HTTP/1.1 client for the data-path tests; runs inside the scoped cgroup.

Usage: client.py HOST PORT SCRIPT_JSON. SCRIPT_JSON is a list of "writes": each
item is a list of byte strings (latin-1) sent as separate send() calls on ONE
connection, then the client reads the number of responses given by "expect".
Prints a JSON list of responses: {"status", "headers", "body"}.
"""

from __future__ import annotations

import json
import socket
import sys

from k2_http import read_response_head


def read_response(f) -> dict:  # type: ignore[no-untyped-def]
    while True:  # interim 1xx responses (100 Continue) are skipped
        res = read_one(f)
        if not 100 <= res["status"] < 200:
            return res


def read_one(f) -> dict:  # type: ignore[no-untyped-def]
    got = read_response_head(f)
    if got is None:
        return {"status": 0, "headers": {}, "body": ""}
    status, headers = got
    n = int(headers.get("content-length", "0"))
    body = f.read(n).decode("latin-1") if n else ""
    return {"status": status, "headers": headers, "body": body}


def main() -> None:
    host, port, script = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    out = []
    for conn in script:
        s = socket.create_connection((host, port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")
        res = []
        for step in conn:
            for chunk in step["send"]:
                s.sendall(chunk.encode("latin-1"))
                if step.get("pause"):
                    import time
                    time.sleep(step["pause"])
            for _ in range(step.get("expect", 1)):
                res.append(read_response(f))
        s.close()
        out.append(res)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
