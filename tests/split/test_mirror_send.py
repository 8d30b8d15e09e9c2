"""The mirror senders' batches (fastpath.mirror_send) against a real loopback server.

A batch goes out on one kept-alive connection per shadow, every response is
read; connections are reused; a kept-alive connection the server closed is
retried once on a fresh one; a server that closes without answering got the
shadow (`sent`, as before the batching); a refused connection is
`send_failed`. No kernel, no Envoy (tests/kernel_mirror sends through Envoy).
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from fastpath.mirror_send import SenderConns, Shadow

GOT: list[str] = []


class Rec(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        GOT.append(self.path)
        if self.path.startswith("/mute"):
            self.close_connection = True  # no answer at all
            return
        self.send_response(200)
        self.send_header("content-length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Rec)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    GOT.clear()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _connect(sh: Shadow) -> socket.socket:
    return socket.create_connection((sh.address, sh.port), timeout=5)


def _batch(port: int, *paths: str) -> list[tuple[Shadow, bytes]]:
    out = []
    for p in paths:
        req = f"GET {p} HTTP/1.1\r\nhost: web-shadow\r\n\r\n".encode()
        out.append((Shadow("127.0.0.1", port, req, True, 5.0), req))
    return out


def test_batches_reuse_and_retry(server: int) -> None:
    stats: Counter[str] = Counter()
    conns = SenderConns(_connect, lambda what: stats.update([what]))
    try:
        conns.send_batch(_batch(server, *(f"/a{i}" for i in range(5))))
        assert stats == {"sent": 5} and sorted(GOT) == [f"/a{i}" for i in range(5)]
        idle = conns.idle[("127.0.0.1", server)]
        assert len(idle) == 5
        for s in idle[:2]:  # as if the server had closed them while idle
            s.shutdown(socket.SHUT_RDWR)
        conns.send_batch(_batch(server, "/b0", "/b1", "/b2", "/mute", "/b3"))
        assert stats == {"sent": 10}, stats
        assert sorted(GOT[5:]) == ["/b0", "/b1", "/b2", "/b3", "/mute"]  # each once
    finally:
        conns.close()


def test_refused_counts_send_failed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there
    stats: Counter[str] = Counter()
    conns = SenderConns(_connect, lambda what: stats.update([what]))
    conns.send_batch(_batch(port, "/x", "/y"))
    assert stats == {"send_failed": 2}
