"""A slow HTTP/1.1 upstream for the route-timeout tests (NAME=timeout).

Per request, headers choose the behaviour: `x-delay-ms: N` answers after N ms;
`x-stall-ms: N` sends the head and 3 of 10 body bytes at once, the other 7
after N ms; `x-close: fin` closes the connection without answering, `x-close:
rst` does so with SO_LINGER 0 (a RST; the reset tests); `x-cut: cl` (or
`cl-rst`, `chunked`, `whole`, `chwhole`: chunked) sends 3 of 10 body bytes (a RST after them;
one chunk of a chunked body; the whole answer), then closes (the close
tests); `x-close: die` stops serving as a dead app does: the listener and every
connection closed, the process kept (the mesh's supervisor would restart it).
HEAD gets the head only (with the GET's Content-Length). Each answer's body names the request line. Every connection's end
is recorded ("eof" or the error, with the time), so a test can tell that the
proxy closed its upstream connection after a timeout.

In-process (`SlowServer`, threads of the test process, outside the test's
cgroup) or as a script in a pod's netns: `k2_slow.py PORT EVENTS_FILE`.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time

from k2_http import recv_head


class SlowServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, events: str | None = None) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.events: list[dict] = []  # type: ignore[type-arg]
        self._file = open(events, "a") if events else None  # noqa: SIM115
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self.dead = False  # x-close: die: nothing is served or recorded any more
        threading.Thread(target=self._accept, daemon=True).start()

    def _note(self, **ev: object) -> None:
        ev["t"] = time.monotonic()
        with self._lock:
            self.events.append(ev)
            if self._file:
                self._file.write(json.dumps(ev) + "\n")
                self._file.flush()

    def _accept(self) -> None:
        n = 0
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            n += 1
            threading.Thread(target=self._serve, args=(c, n), daemon=True).start()

    def _die(self) -> None:
        """As a crashed single replica: nothing listens, every connection closes."""
        self.dead = True
        self.sock.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _serve(self, c: socket.socket, conn: int) -> None:
        buf = b""
        with self._lock:
            self._conns.add(c)
        with c:
            while True:
                got = recv_head(c, buf, lambda how: self._note(conn=conn, kind="end", how=how))
                if got is None:
                    return
                head, buf = got
                if self.dead:  # a connection that was still being set up
                    return
                lines = head.decode("latin-1").split("\r\n")
                hdr = {k.strip().lower(): v.strip() for k, _, v in
                       (ln.partition(":") for ln in lines[1:])}
                self._note(conn=conn, kind="request", line=lines[0])
                if "x-close" in hdr:  # no answer: the app closes (FIN) or aborts (RST)
                    if hdr["x-close"] == "die":
                        self._die()
                    if hdr["x-close"] == "rst":
                        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if "x-cut" in hdr:  # a response cut by the app's close (or whole, then closed)
                    self._cut(c, hdr["x-cut"])
                    return
                try:
                    self._answer(c, lines[0], hdr, conn)
                except OSError as exc:
                    self._note(conn=conn, kind="send_error", how=type(exc).__name__)

    def _answer(self, c: socket.socket, line: str, hdr: dict[str, str], conn: int) -> None:
        body = json.dumps({"line": line, "conn": conn,
                           "expected_timeout": hdr.get("x-envoy-expected-rq-timeout-ms")}).encode()
        if "x-stall-ms" in hdr:
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nx-served-by: slow\r\n\r\nabc")
            time.sleep(int(hdr["x-stall-ms"]) / 1000)
            c.sendall(b"defghij")
            self._note(conn=conn, kind="late_sent", line=line)
            return
        delay = int(hdr.get("x-delay-ms", "0"))
        if delay:
            time.sleep(delay / 1000)
        c.sendall(f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\nx-served-by: slow\r\n\r\n"
                  .encode() + (b"" if line.startswith("HEAD ") else body))
        if delay:
            self._note(conn=conn, kind="late_sent", line=line)

    def _cut(self, c: socket.socket, how: str) -> None:
        data = {"cl": b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
                "chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n",
                "whole": b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc",
                "chwhole": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                           b"3\r\nabc\r\n0\r\n\r\n"}
        c.sendall(data[how.removesuffix("-rst")])
        time.sleep(0.1)  # the bytes reach the client before the close
        if how.endswith("-rst"):
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def ends(self) -> list[dict]:  # type: ignore[type-arg]
        with self._lock:
            return [e for e in self.events if e["kind"] == "end"]

    def close(self) -> None:
        self.sock.close()
        if self._file:
            self._file.close()


if __name__ == "__main__":
    srv = SlowServer("0.0.0.0", int(sys.argv[1]), sys.argv[2])
    print("ready", flush=True)
    threading.Event().wait()
