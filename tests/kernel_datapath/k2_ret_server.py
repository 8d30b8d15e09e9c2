"""An upstream whose responses take every framing Envoy passes on, for the
tests of connections coming back from Envoy (test_return.py).

Owner: envoyreturn. Runs in a thread of the test process (outside the scoped
cgroup). Each response body is JSON naming the request line, so a test can
check which response answered which request. Paths (any prefix before them):
  .../chunked  chunked body in 4 chunks written 5 ms apart (Envoy streams them)
  .../pieces   Content-Length body written in 30 pieces 2 ms apart
  .../big      Content-Length body of 300 kB
  .../nobody   204 No Content
  anything     Content-Length body; a HEAD gets the headers only
"""

from __future__ import annotations

import json
import socket
import time

from k2_http import ThreadedServer, recv_head


class RetServer(ThreadedServer):
    """Keep-alive HTTP/1.1 server (Content-Length request bodies only)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        super().__init__()

    def _serve(self, c: socket.socket) -> None:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        with c:
            while True:
                got = recv_head(c, buf)
                if got is None:
                    return
                head, buf = got
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                self.seen.append(line)
                try:
                    self._respond(c, line)
                except OSError:
                    return

    def _respond(self, c: socket.socket, line: str) -> None:
        method, path = line.split(" ")[:2]
        body = json.dumps({"line": line}).encode()
        if path.endswith("/nobody"):
            c.sendall(b"HTTP/1.1 204 No Content\r\nx-served-by: upstream\r\n\r\n")
        elif path.endswith("/chunked"):
            c.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-served-by: upstream\r\n\r\n")
            q = len(body) // 4 + 1
            parts = [body[i * q:(i + 1) * q] for i in range(4)]
            for p in parts:
                time.sleep(0.005)
                c.sendall(b"%x\r\n%s\r\n" % (len(p), p))
            c.sendall(b"0\r\n\r\n")
        elif path.endswith("/pieces") or path.endswith("/big"):
            if path.endswith("/big"):
                body = body + b" " * 300_000
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nx-served-by: upstream\r\n\r\n"
                      % len(body))
            if method == "HEAD":
                return
            step = max(1, len(body) // 30) if path.endswith("/pieces") else len(body)
            for i in range(0, len(body), step):
                c.sendall(body[i:i + step])
                if path.endswith("/pieces"):
                    time.sleep(0.002)
        else:
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nx-served-by: upstream\r\n\r\n"
                      % len(body) + (b"" if method == "HEAD" else body))
