"""A kernel retry that finds no upstream: the request goes to Envoy.

Owner: NAME=close (K2 agent). One `Handoff` per node datapath, owned by
`fastpath.agent_node.NodeDatapath`; `Retrier.on_lost` (fastpath/agent_retry.py,
event thread) calls `hand(client, request)` when the retry of a request found
no pooled upstream on any endpoint of its cluster (`no_upstream`): typically a
single-replica app that died, whose pooled connections closed with it.

What Envoy does there (the mesh with `--fastpath off`, tests/kernel_differential/
test_reset_mesh.py): the destination's sidecar answers the app's close with a
503 ("... reset reason: connection termination"), the client's sidecar retries
it by its status, the destination's sidecar cannot connect any more and
answers 503 "... reset reason: remote connection failure, transport failure
reason: delayed connect error: Connection refused" (its exact text depends on
the destination), and the client gets the last attempt's answer.

The agent cannot connect either (its pools are empty) and does not know the
destination sidecar's answer, so it asks the client's own sidecar, which is
exact: a thread enters the client pod's network namespace, finds the client
socket's destination (the service address: sock_diag by the socket's cookie),
connects to it (the agent is not uid 1337: the pod's outbound interception
takes the connection to its sidecar, which routes, retries and answers as for
any request) and writes the kernel's copy of the request; the answer is
written into the client's receive queue through the agent's injector socket
(dp_inj slot 4). Before this the request was lost and the client waited.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Any

from fastpath.pools import enter_netns
from fastpath.retry import FramingError, request_method, response_end
from fastpath.timeouts import NETLINK_SOCK_DIAG, NLM_F_REQUEST, NLMSG_ERROR, LazyInjector

log = logging.getLogger(__name__)

INJECTOR_SLOT = 4  # dp_inj: 0 timeouts, 1 delays, 2 redirects, 3 resets
ANSWER_S = 30.0  # longest wait for the sidecar's answer (its own timeouts come first)
MAX_IN_FLIGHT = 64  # handoff threads at once; beyond, a lost retry stays lost (counted)
SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, NLMSG_DONE = 20, 0x300, 3
TCP_ESTABLISHED = 1


def diag_dump_msg() -> bytes:
    """The netlink request dumping the IPv4 TCP sockets of a namespace."""
    body = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0,
                       1 << TCP_ESTABLISHED) + bytes(48)
    return struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY,
                       NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body


def find_destination(batch: bytes, cookie: int) -> tuple[str, int] | None | bool:
    """The destination (ip, port) of socket `cookie` in one batch of netlink
    replies to diag_dump_msg; True when the dump is over (not found), None
    when more batches follow. Pure: the unit tests call it."""
    off = 0
    while off + 16 <= len(batch):
        n, kind = struct.unpack_from("=IH", batch, off)
        if kind in (NLMSG_DONE, NLMSG_ERROR) or n < 16:
            return True
        msg = off + 16  # struct inet_diag_msg: 4 bytes, then inet_diag_sockid
        dport = struct.unpack_from(">H", batch, msg + 6)[0]
        dst = socket.inet_ntoa(batch[msg + 24:msg + 28])
        lo, hi = struct.unpack_from("=II", batch, msg + 44)
        if lo | hi << 32 == cookie:
            return dst, dport
        off += (n + 3) & ~3
    return None


class Handoff:
    """Sends lost retries to the client's sidecar and their answers to the client."""

    def __init__(self, dp: Any, netns: str | None) -> None:
        self.dp = dp
        self.netns = netns  # the client pod's network namespace (its sockets)
        self.counts = {"handed": 0, "answered": 0, "failed": 0, "over_limit": 0}
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self.injector = LazyInjector(dp, slot=INJECTOR_SLOT)  # one writer at a time

    def hand(self, client: int, request: bytes) -> bool:
        """Event thread: start the request's way through Envoy (a thread, at
        most MAX_IN_FLIGHT at once: a burst of lost retries to a dead service
        must not start a thread each). False when it was not handed over (the
        caller then leaves the request to the route timer, if it has one)."""
        if not self._slots.acquire(blocking=False):
            self.counts["over_limit"] += 1
            log.warning("handoff: %d in flight, client %d's lost retry not handed over",
                        MAX_IN_FLIGHT, client)
            return False
        self.counts["handed"] += 1
        threading.Thread(target=self._run, args=(client, request), daemon=True,
                         name="l7fp-handoff").start()
        return True

    def _run(self, client: int, request: bytes) -> None:
        try:
            self._answer(client, request)
        finally:
            self._slots.release()

    def _answer(self, client: int, request: bytes) -> None:
        try:
            if self.netns:
                enter_netns(self.netns)
            answer = _ask_envoy(client, request)
        except (OSError, FramingError) as exc:
            log.warning("handoff: client %d's lost retry not answered: %s", client, exc)
            self.counts["failed"] += 1
            return
        ok = self.injector.send(client, answer)
        self.counts["answered" if ok else "failed"] += 1

    def close(self) -> None:
        """NodeDatapath.close, before the maps close. The handoff threads are
        not joined (each may wait ANSWER_S for Envoy's answer): a thread that
        ends later finds the injector closed, its send a no-op (counted
        failed), and touches no map."""
        self.injector.close()


def _destination(cookie: int) -> tuple[str, int]:
    """The destination of this namespace's TCP socket `cookie` (sock_diag)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.send(diag_dump_msg())
        while True:
            got = find_destination(nl.recv(65536), cookie)
            if got is True:
                raise OSError(f"client socket {cookie} not found")
            if isinstance(got, tuple):
                return got


def _ask_envoy(client: int, request: bytes) -> bytes:
    """The answer of the pod's sidecar to `request` sent to the client's destination."""
    dst = _destination(client)
    method = request_method(request)
    deadline = time.monotonic() + ANSWER_S
    with socket.create_connection(dst, timeout=ANSWER_S) as s:
        s.sendall(request)
        buf = b""
        while (end := response_end(buf, method)) is None:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            data = s.recv(65536)
            if not data:
                if not buf:
                    raise OSError(f"{dst[0]}:{dst[1]} closed without an answer")
                return buf  # close-delimited
            buf += data
        return buf[:end]
