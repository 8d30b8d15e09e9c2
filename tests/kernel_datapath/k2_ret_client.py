"""HTTP/1.1 client for test_return.py; runs inside the scoped cgroup.

Usage: k2_ret_client.py HOST PORT SCRIPT_JSON. SCRIPT_JSON is a list of steps
on ONE keep-alive connection; a step is {"send": [METHOD PATH, ...]}: the
requests are written one write() each (no reading in between: pipelined
across writes when there are several), then their responses are read in
order. Understands Content-Length, chunked, HEAD and 204. Prints a JSON list
of {"status", "headers", "body"}, the body de-chunked.
"""

from __future__ import annotations

import json
import socket
import sys

from k2_http import read_response_head


def read_body(f, headers: dict[str, str]) -> bytes:  # type: ignore[no-untyped-def]
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out = b""
        while True:
            n = int(f.readline().split(b";")[0].strip(), 16)
            if n == 0:
                while f.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return out
            out += f.read(n)
            f.readline()
    return f.read(int(headers.get("content-length", "0")))  # type: ignore[no-any-return]


def read_response(f, method: str) -> dict:  # type: ignore[no-untyped-def]
    got = read_response_head(f)
    if got is None:
        return {"status": 0, "headers": {}, "body": ""}
    status, headers = got
    body = b"" if method == "HEAD" or status in (204, 304) else read_body(f, headers)
    return {"status": status, "headers": headers, "body": body.decode("latin-1")}


def main() -> None:
    host, port, script = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    out: list[dict] = []  # type: ignore[type-arg]
    try:
        for step in script:
            reqs = [r.split(" ", 1) for r in step["send"]]
            for method, path in reqs:
                s.sendall(f"{method} {path} HTTP/1.1\r\nHost: svc\r\n\r\n".encode())
            for method, _ in reqs:
                out.append(read_response(f, method))
    except OSError as e:  # what was read so far says where it broke
        sys.exit(f"{e!r} after {json.dumps(out)}")
    s.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
