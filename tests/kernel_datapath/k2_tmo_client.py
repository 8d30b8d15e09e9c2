"""Raw HTTP/1.1 client for the route-timeout and fault-delay tests (test_timeouts,
test_delay and their mesh variants); runs inside the scoped cgroup or a pod.

Usage: k2_tmo_client.py HOST PORT SCRIPT_JSON. SCRIPT_JSON: a list of
connections, each a list of request strings sent one at a time on ONE
connection, each followed by reading one response (Content-Length framing,
or chunked without trailers) until it is complete, the peer closes, or an error. Two items are not
requests: "SLEEP S" pauses S seconds before the next request; "CLOSE" closes
the connection right after the previous request was sent, without reading its
response (a client giving up during a delay). Prints a JSON list (per
connection) of {"status", "headers", "body", "end", "secs"}; "end" is
"complete", "eof" or the error's class name; a request that cannot be sent
(the connection was cut) ends its connection with status 0 and "end" the
error's class name.
"""

from __future__ import annotations

import json
import socket
import sys
import time


def _chunked(buf: bytes) -> bool:
    head = buf.split(b"\r\n\r\n", 1)[0].lower()
    return b"\r\n\r\n" in buf and b"transfer-encoding: chunked" in head


def read_response(s: socket.socket, t0: float, head_only: bool = False) -> dict:  # type: ignore[type-arg]
    """One response from `s`; its "secs" count from `t0`, taken before the request's
    write (the kernel's delay and timeout clocks start inside that write: a client
    descheduled between the write and its clock would see them short)."""
    buf = b""
    end, need = "complete", None
    while True:
        if need is None and b"\r\n\r\n" in buf:
            head = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1")
            cl = [ln.split(":", 1)[1] for ln in head.split("\r\n")[1:]
                  if ln.lower().startswith("content-length:")]
            need = len(head) + 4 + (0 if head_only else int(cl[0])) if cl else None
            if head_only and need is None:  # HEAD: never a body (Envoy's chunked redirect)
                need = len(head) + 4
        if need is None and _chunked(buf):  # a chunked body ends with its last chunk
            last = buf.find(b"\r\n0\r\n\r\n")
            if last >= 0:
                buf = buf[:last + 7]
                break
        if need is not None and len(buf) >= need:
            break
        try:
            d = s.recv(65536)
        except OSError as exc:
            end = type(exc).__name__
            break
        if not d:
            end = "eof"
            break
        buf += d
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (ln.partition(":") for ln in lines[1:] if ln)}
    return {"status": status, "headers": headers, "body": body.decode("latin-1"), "end": end,
            "secs": round(time.monotonic() - t0, 3)}


def main() -> None:
    host, port, script = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    out = []
    for conn in script:
        s = socket.create_connection((host, port), timeout=20)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        res = []
        for i, req in enumerate(conn):
            if req.startswith("SLEEP "):  # a pause between two requests
                time.sleep(float(req.split()[1]))
                continue
            if req == "CLOSE":
                break
            t0 = time.monotonic()
            try:
                s.sendall(req.encode("latin-1"))
            except OSError as exc:  # the peer closed after the previous response
                res.append({"status": 0, "headers": {}, "body": "", "end": type(exc).__name__,
                            "secs": 0.0})
                break
            if conn[i + 1:i + 2] == ["CLOSE"]:  # gives up: no response read
                break
            r = read_response(s, t0, head_only=req.startswith("HEAD "))
            res.append(r)
            if r["end"] != "complete":
                break
        s.close()
        out.append(res)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
