"""Raw HTTP/1.1 client for the fault-delay test; runs inside the scoped cgroup.

Usage: k2_delay_client.py HOST PORT SCRIPT_JSON. SCRIPT_JSON: a list of
connections, each a list of request strings sent one at a time on ONE
connection, each followed by reading its response (k2_tmo_client.read_response);
the item "CLOSE" closes the connection right after the previous request was
sent, without reading its response (a client giving up during a delay). Prints
a JSON list (per connection) of {"status", "headers", "body", "end", "secs"}.
"""

from __future__ import annotations

import json
import socket
import sys

from k2_tmo_client import read_response


def main() -> None:
    host, port, script = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    out = []
    for conn in script:
        s = socket.create_connection((host, port), timeout=20)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        res = []
        for i, req in enumerate(conn):
            if req == "CLOSE":
                continue
            s.sendall(req.encode("latin-1"))
            if i + 1 < len(conn) and conn[i + 1] == "CLOSE":
                break
            r = read_response(s, head_only=req.startswith("HEAD "))
            res.append(r)
            if r["end"] != "complete":
                break
        s.close()
        out.append(res)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
