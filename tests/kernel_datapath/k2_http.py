"""The one HTTP/1.1 head reader of the test upstream servers (k2_helpers.HttpServer,
k2_ret_server, k2_slow), their Content-Length body reader (recv_body) and threaded
accept loop (ThreadedServer). Standard library only: k2_slow runs as a script inside
mesh pods."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any


def recv_head(c: socket.socket, buf: bytes,
              on_end: Callable[[str], None] | None = None) -> tuple[bytes, bytes] | None:
    """Read from `c` until `buf` holds a whole request head: (head, bytes after it),
    or None when the peer closed ("eof") or the socket failed (the exception's
    name); `on_end` is told which."""
    while b"\r\n\r\n" not in buf:
        try:
            d = c.recv(65536)
        except OSError as exc:
            if on_end:
                on_end(type(exc).__name__)
            return None
        if not d:
            if on_end:
                on_end("eof")
            return None
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def recv_body(c: socket.socket, buf: bytes, n: int) -> tuple[bytes, bytes] | None:
    """Read from `c` until `buf` holds a body of `n` bytes: (body, bytes after
    it), or None when the peer closed first."""
    while len(buf) < n:
        d = c.recv(65536)
        if not d:
            return None
        buf += d
    return buf[:n], buf[n:]


def read_response_head(f) -> tuple[int, dict[str, str]] | None:  # type: ignore[no-untyped-def]
    """Status and lower-case headers of the next response on the binary file `f`,
    or None when the peer closed before a status line."""
    line = f.readline().decode("latin-1")
    if not line:
        return None
    status = int(line.split()[1])
    headers: dict[str, str] = {}
    while True:
        h = f.readline().decode("latin-1").rstrip("\r\n")
        if not h:
            return status, headers
        k, _, v = h.partition(":")
        headers[k.strip().lower()] = v.strip()


class ThreadedServer:
    """A listening TCP socket on `host`, port chosen by the kernel (`port`); one
    thread accepts, one thread per connection runs the subclass's `_serve(c)`.

    The base of the in-process test upstreams (test_delay.EchoUpstream,
    k2_ret_server.RetServer); their owner calls `close()`, which also ends the
    accept thread."""

    def __init__(self, host: str = "127.0.0.1", backlog: int = 128) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(backlog)
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


# Request headers Envoy's router adds and the fast path does not (on a route
# without a timeout the kernel sends none, Envoy its default 15000)
ENVOY_ADDS = {"x-envoy-expected-rq-timeout-ms"}


def own_socket(port: int) -> bool:
    """True when this process holds the TCP socket bound to local `port`: an
    upstream's peer that is an agent's pool socket (the agent runs in the test
    process), not Envoy's. Read from /proc (socket inodes of our fds, the
    netns's TCP table): which way a request went, now that the kernel path
    adds x-request-id as Envoy does."""
    import os

    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            mine.add(link[8:-1])
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            for row in list(f)[1:]:
                cols = row.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[9] in mine:
                    return True
    return False


def upstream_heads(seen: list[dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """What an echo upstream (test_delay.EchoUpstream) saw, by the request's
    x-case header: (request line, headers but ENVOY_ADDS, body, Envoy sent it:
    the record's "via_envoy", see own_socket). A fresh UUID v4 x-request-id
    reads "<uuid4>" (either way's is random; fastpath.request_id.normalized);
    x-forwarded-proto is compared as is."""
    from fastpath.request_id import normalized  # here: this module is stdlib-only for k2_slow

    out = {}
    for r in seen:
        hdrs = [(k, normalized(k, v)) for k, v in r["headers"] if k not in ENVOY_ADDS]
        out[dict(r["headers"])["x-case"]] = (r["line"], hdrs, r["body"],
                                             r["via_envoy"])
    return out
