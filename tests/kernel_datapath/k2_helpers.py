"""Real servers and clients for the data-path kernel tests (K2).

Owner: K2. The upstream and the stand-in slow path are real TCP servers (in
threads of the test process, which is NOT in the scoped cgroup, so their own
sockets are never tracked); clients run in a child process placed in the
scoped cgroup, so sock_ops sees their connections.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from k2_http import recv_body, recv_head

from fastpath.loader import cgroup2_root


class HttpServer:
    """A keep-alive HTTP/1.1 server answering `x-served-by: NAME` and echoing the request.

    Records every request head it parsed (so tests can prove a denied request
    never reached it). Content-Length bodies only.
    """

    def __init__(self, name: str, host: str = "127.0.0.1") -> None:
        self.name = name
        self.seen: list[str] = []
        self.conns = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.conns += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        buf = b""
        with c:
            while True:
                got = recv_head(c, buf)
                if got is None:
                    return
                head, rest = got
                lines = head.decode("latin-1").split("\r\n")
                n = 0
                for ln in lines[1:]:
                    k, _, v = ln.partition(":")
                    if k.strip().lower() == "content-length":
                        n = int(v.strip())
                got_body = recv_body(c, rest, n)
                if got_body is None:
                    return
                body, buf = got_body
                with self._lock:
                    self.seen.append(lines[0])
                out = json.dumps({"by": self.name, "line": lines[0], "headers": lines[1:],
                                  "body_len": len(body)}).encode()
                resp = (f"HTTP/1.1 200 OK\r\ncontent-length: {len(out)}\r\n"
                        f"x-served-by: {self.name}\r\n\r\n").encode() + out
                try:
                    c.sendall(resp)
                except OSError:
                    return

    def close(self) -> None:
        self._stop = True
        self.sock.close()


class ScopedCgroup:
    """A cgroup v2 directory of our own (prefix l7fp-k2-), removed on close."""

    def __init__(self, tag: str) -> None:
        self.path = cgroup2_root() / f"l7fp-k2-{tag}-{os.getpid()}"
        self.path.mkdir(exist_ok=True)

    def run(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command inside this cgroup (the child moves itself in before exec)."""
        procs = self.path / "cgroup.procs"
        script = f'echo $$ > "{procs}" && exec "$@"'
        return subprocess.run(["sh", "-c", script, "sh", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)

    def popen(self, args: list[str]) -> subprocess.Popen[str]:
        procs = self.path / "cgroup.procs"
        script = f'echo $$ > "{procs}" && exec "$@"'
        return subprocess.Popen(["sh", "-c", script, "sh", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def close(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                for pid in (self.path / "cgroup.procs").read_text().split():
                    try:
                        os.kill(int(pid), 9)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)


CLIENT = Path(__file__).with_name("k2_client.py")


def client_cmd(*args: str) -> list[str]:
    return [sys.executable, str(CLIENT), *args]
