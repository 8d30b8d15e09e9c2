"""The connections of one mirror sender thread (fastpath.agent_mirror).

Owner: the mirror part of K2. A `SenderConns` belongs to one sender thread of
a `Mirrorer` (no locking): `send_batch()` sends the shadows the thread took
from the queue at once, each on a kept-alive connection of its own to its
endpoint (opened when none is idle): all the writes first, then the responses
in the same order, read to their end and discarded. So a thread has a whole
batch in flight for one wake-up, instead of one round trip per shadow. Not
HTTP/1.1 pipelining on one connection: Envoy (the mirror's inbound sidecar)
reads a pipelined request only about 40 ms after the previous response
(seen with Envoy 1.40 on loopback, benchmarks/mirror_senders.py).

Failures are counted as before the batching: a write or read error on a
kept-alive connection is retried once on a fresh one (the server had closed
it); a server that closes without a response got the shadow (`sent`, as a
broken mirror's); a fresh connection's error counts `timeout`/`send_failed`.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from fastpath.mirror import request_method
from fastpath.retry import FramingError, response_end

log = logging.getLogger(__name__)

MAX_RESPONSE = 1 << 20
IDLE_MAX = 64  # idle connections kept per endpoint per thread (more are closed)


@dataclass(frozen=True)
class Shadow:
    """One shadow to send: the kernel's copy, made a shadow by the sender."""

    address: str
    port: int
    req: bytes  # the request as the kernel forwarded it
    host_suffix: bool
    timeout_s: float


InFlight = tuple[Shadow, bytes, socket.socket, bool]  # shadow, bytes, its socket, fresh


class SenderConns:
    def __init__(self, connect: Callable[[Shadow], socket.socket],
                 count: Callable[[str], None]) -> None:
        self.connect = connect  # a new socket connected to the shadow's endpoint
        self.count = count
        self.idle: dict[tuple[str, int], list[socket.socket]] = {}

    def send_batch(self, items: list[tuple[Shadow, bytes]]) -> None:
        """Send each (shadow, its bytes) and read every response."""
        inflight = [w for sh, data in items if (w := self._write(sh, data)) is not None]
        for w in inflight:
            self._finish(*w)

    def close(self) -> None:
        for conns in self.idle.values():
            for s in conns:
                s.close()
        self.idle.clear()

    def _write(self, sh: Shadow, data: bytes, fresh_only: bool = False) -> InFlight | None:
        conns = self.idle.get((sh.address, sh.port))
        s = conns.pop() if conns and not fresh_only else None
        fresh = s is None
        try:
            if s is None:
                s = self.connect(sh)
            s.settimeout(sh.timeout_s)
            s.sendall(data)
            return sh, data, s, fresh
        except OSError as exc:
            if s is not None:
                s.close()
            if fresh:
                self._failed(sh, exc)
                return None
            return self._write(sh, data, fresh_only=True)

    def _finish(self, sh: Shadow, data: bytes, s: socket.socket, fresh: bool) -> None:
        try:
            keep = discard_response(s, request_method(sh.req))
        except OSError as exc:
            s.close()
            if fresh:
                self._failed(sh, exc)
            elif (w := self._write(sh, data, fresh_only=True)) is not None:
                self._finish(*w)
            return
        conns = self.idle.setdefault((sh.address, sh.port), [])
        if keep and len(conns) < IDLE_MAX:
            conns.append(s)
        else:
            s.close()
        self.count("sent")

    def _failed(self, sh: Shadow, exc: OSError) -> None:
        self.count("timeout" if isinstance(exc, TimeoutError) else "send_failed")
        log.info("mirror: shadow to %s:%d failed: %s", sh.address, sh.port, exc)


def discard_response(s: socket.socket, method: str) -> bool:
    """Read the response to its end; True when the connection can be reused."""
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return False
        buf += chunk
        try:
            end = response_end(buf, method)
        except FramingError:
            return False
        if end is not None:
            return b"connection: close" not in buf[:end].lower() and len(buf) == end
        if len(buf) > MAX_RESPONSE:
            return False
