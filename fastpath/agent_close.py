"""An upstream app that closes in the middle of a response: the agent half.

Owner: NAME=close (K2 agent). One `Closer` per node datapath, owned by
`fastpath.agent_node.NodeDatapath`; its `claim(up)` runs on the agent's event
thread from the pools' look at readable upstream sockets, last in the chain
(after the retry, delay and reset agents: a request still waiting for its
first response byte is the reset agent's 503). The kernel half is
bpf_src/dp_close.h: dp_peer[U].left counts down the bytes of the response in
flight on U (DP_LEFT_UNKNOWN when its framing is not tracked).

What Envoy 1.40 does (seen with the real binary, tests/kernel_datapath/test_close.py):
when the upstream connection closes (FIN or RST) after the response started
and before it is complete, Content-Length or chunked, Envoy closes the
client's connection with a FIN (its delayed_close_timeout, about 1 s, after
the upstream's close); when the response was complete, or delimited by the
close itself (Envoy re-frames it chunked), it keeps the client's connection.

The agent, at U's EOF with the response started (`wait` 0) and not complete
(`left` not 0), takes U off every way and gives the client an EOF behind the
bytes it has: its own carrier socket goes into dp_up with dp_peer[carrier] =
{client, DP_WAIT_EOF} and the other end of the carrier is shut down; the
carrier's FIN reaches dp_skb_verdict as an empty skb, which dp_close_eof
redirects into the client's receive queue. The client reads the bytes that
came, then EOF, as from Envoy; at once instead of Envoy's second. A response
whose framing the kernel does not track (chunked, close-delimited, 1xx, a
head over 512 bytes or split) is taken as ended by the close: the client of
a close-delimited response needs that EOF to see its end (Envoy would keep
the connection), and a complete chunked response then loses its connection
where Envoy keeps it (docs/fastpath.md, Limits).

The EOF itself (`send_eof`: a carrier pair, its FIN's passage, 2.3-4.6 ms,
most of it the wait for the verdict) runs on the Closer's own worker thread,
not on the event thread, which it blocked for every other connection of the
node meanwhile. One worker, FIFO: EOFs leave in the order they were asked
for. The order against the client's later bytes is the one it had on the
event thread: U is off every way before the EOF is queued (claim), so no byte
of U can follow it, and a client does not send a request behind an
unfinished response (nor after `Connection: close`). The exception: a
response that was whole but is taken as ended by the close (above: chunked
with trailers or a split last chunk, a head over 512 bytes or split). Its
client saw a finished response and may send its next keep-alive request at
once; an EOF reaching it between that request and its response closes the
connection under it. So the worker skips (counted `close_skipped`) the EOF of
a client that has forwarded a request since it was queued, as far as the
agent can see it: a request bound to an upstream and waiting for its first
byte (dp_peer wait, `forwarded`), or a DP_EV_CLOSE of the client (its
request found U gone and went to Envoy, or it closed: `moved_on`). A request
the kernel answers itself, or one whose event the event thread has not read
yet, is not seen: the EOF may still cut it (docs/fastpath.md, Limits).
"""

from __future__ import annotations

import ctypes as ct
import logging
import queue
import select
import socket
import threading
import time
from typing import Any

from fastpath import bpfsys
from fastpath.agent_reset import PeerVal

log = logging.getLogger(__name__)

DP_WAIT_HEAD = 2  # datapath.h: dp_peer_val.wait of a HEAD request
DP_WAIT_EOF = 0x454F46  # datapath.h: dp_peer_val.wait of an EOF carrier
DP_LEFT_UNKNOWN = 0xFFFFFFFF  # datapath.h: dp_peer_val.left, framing not tracked
DP_EV_CLOSE_REPLY = 9  # dp_close.h: a kernel reply after which the client is closed
EOF_WAIT_S = 0.5  # how long the carrier's FIN may take to pass (loopback: microseconds)
AFTER_REPLY_S = 0.002  # the reply is in the client's queue when sk_msg returns: margin


def wait_value(request: bytes) -> int:
    """dp_peer_val.wait for a request forwarded on an upstream (sk_msg's
    dp_reset_wait; the retry agent's writes): 1, with DP_WAIT_HEAD for a HEAD,
    whose response has no body."""
    return 1 | (DP_WAIT_HEAD if request.startswith(b"HEAD ") else 0)


def forwarded(peers: Any, client: int) -> bool:
    """True when `client` has a request forwarded on some upstream and waiting
    for its first response byte; `peers`: dp_peer's (key, value) pairs. Pure:
    the unit tests call it with plain objects."""
    return any(int(v.client) == client and int(v.wait) not in (0, DP_WAIT_EOF)
               for _, v in peers)


def action(peer: Any | None) -> str:
    """What U's close means for its client, from U's dp_peer value (None:
    none bound). Pure: the unit tests call it with plain objects.

    "none": no client, a request still waiting for its first byte (the reset
    agent's 503), or a response that passed whole; "eof": the response started
    and did not pass whole (or its end is not known): close the client."""
    if peer is None or int(peer.wait):
        return "none"
    return "eof" if int(peer.left) else "none"


class Closer:
    """Closes the client of an upstream whose app closed in a response."""

    def __init__(self, dp: Any) -> None:
        self.dp = dp
        self.counts = {"close_eof": 0, "close_failed": 0, "close_after_reply": 0,
                       "close_skipped": 0}
        self._due: list[tuple[float, int]] = []  # (monotonic time, client) to close
        # (client, count on success) for the worker; None stops it
        self._eofs: queue.Queue[tuple[int, str] | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        # Set by close(): no EOF is queued or sent after it (the datapath's map
        # fds close right after; their numbers may then be a new datapath's).
        self._closed = False
        self._lock = threading.Lock()  # _queue_eof against close(): one worker, never restarted
        self._queued: dict[int, int] = {}  # client -> its EOFs queued and not yet taken
        self._moved_on: set[int] = set()  # of those, clients seen sending since (moved_on)

    def after_reply(self, client: int) -> None:
        """DP_EV_CLOSE_REPLY (event thread): the kernel answered a `Connection:
        close` request itself (a kernel-owned bucket's 429); Envoy closes the
        connection after such a reply, so the client gets an EOF behind it, at
        the next `service()` (its reply lands when the sk_msg program returns,
        an instant after the event is submitted)."""
        self._due.append((time.monotonic() + AFTER_REPLY_S, client))

    def service(self) -> None:
        """Event thread, each turn: the EOFs due after kernel replies."""
        if not self._due:
            return
        now = time.monotonic()
        due = [c for t, c in self._due if t <= now]
        self._due = [(t, c) for t, c in self._due if t > now]
        for client in due:
            self._queue_eof(client, "close_after_reply")

    def claim(self, up: int) -> bool:
        """`up` is readable at EOF (pools' look). Always False: U stays the
        pools' to close."""
        peer = bpfsys.table_get(self.dp.bpf["dp_peer"], up)
        if action(peer) != "eof" or peer is None:
            return False
        client = int(peer.client)
        key = ct.c_uint64(up)
        bpfsys.map_delete(self.dp.fds["dp_tmo"], key)  # the route timer has nothing to cut
        bpfsys.map_delete(self.dp.fds["dp_tmo_armed"], key)
        self.dp.take_upstream(up)  # before the EOF is queued: no byte of U after it
        log.debug("close: upstream %d closed in a response: EOF to client %d", up, client)
        self._queue_eof(client, "close_eof")
        return False

    def _queue_eof(self, client: int, count: str) -> None:
        """Event thread: the EOF goes to the worker (started at the first one);
        nothing once closed."""
        with self._lock:
            if self._closed:
                return
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="l7fp-close-eof",
                                                daemon=True)
                self._worker.start()
            self._queued[client] = self._queued.get(client, 0) + 1
            self._eofs.put((client, count))

    def moved_on(self, client: int) -> None:
        """DP_EV_CLOSE of `client` (event thread): its next request found its
        upstream gone and went to Envoy, or it closed. An EOF of it still
        queued is skipped: it would land between that request and its answer."""
        with self._lock:
            if client in self._queued:
                self._moved_on.add(client)

    def _skip(self, client: int) -> bool:
        """Worker, before each EOF: whether `client` moved on since it was queued."""
        with self._lock:
            n = self._queued.pop(client, 1) - 1
            if n:
                self._queued[client] = n
            stale = client in self._moved_on
            if not n:
                self._moved_on.discard(client)
        return stale or forwarded(self.dp.bpf["dp_peer"].items(), client)

    def _run(self) -> None:
        """The worker: send_eof for each queued client, in order."""
        while (item := self._eofs.get()) is not None:
            client, count = item
            ok = False
            try:
                if self._skip(client):
                    log.debug("close: client %d sent a request since: its EOF skipped", client)
                    count = "close_skipped"
                    ok = True
                    continue
                ok = self.send_eof(client)
            except Exception:  # a carrier that could not be made: counted; the worker lives on
                log.exception("close: EOF to client %d failed", client)
            finally:
                self.counts[count if ok else "close_failed"] += 1
                self._eofs.task_done()  # after the count: drain() callers read it
        self._eofs.task_done()

    def drain(self) -> None:
        """Wait until every EOF queued so far was sent (tests read the counts)."""
        self._eofs.join()

    def close(self) -> None:
        """Stop the worker (the owner calls it before the datapath's maps
        close). The EOFs still queued are dropped unsent: their clients are
        being detached with the datapath, and sending them (up to EOF_WAIT_S
        each) would outlast the maps. Waits for the one in progress, without a
        timeout: after close() returns, no map fd of this datapath is used."""
        with self._lock:
            self._closed = True
            worker, self._worker = self._worker, None
        if worker is None:
            return
        dropped = self._drop_queued()
        if dropped:
            log.debug("close: %d queued EOFs dropped at close", dropped)
        self._eofs.put(None)
        worker.join()

    def _drop_queued(self) -> int:
        """Empty the queue (close()); each item counts as done for drain()."""
        n = 0
        while True:
            try:
                self._eofs.get_nowait()
            except queue.Empty:
                return n
            self._eofs.task_done()
            n += 1

    def send_eof(self, client: int) -> bool:
        """An EOF into `client`'s receive queue (after what is there), through a
        carrier socket pair of its own (bpf_src/dp_close.h dp_close_eof). False
        when the carrier's FIN did not pass within EOF_WAIT_S."""
        lst = socket.socket()
        try:
            lst.bind(("127.0.0.1", 0))
            lst.listen(1)
            far = socket.create_connection(lst.getsockname(), timeout=2)
            near, _ = lst.accept()
        finally:
            lst.close()
        with far, near:
            cookie = self.dp.add_upstream(near)  # dp_up: the sk_skb verdict sees its FIN
            try:
                bpfsys.map_update(self.dp.fds["dp_peer"], ct.c_uint64(cookie),
                                  PeerVal(client, DP_WAIT_EOF))
                far.shutdown(socket.SHUT_WR)
                passed = _readable(near, EOF_WAIT_S)
                time.sleep(0.002)  # the verdict runs in the softirq that marked the FIN
            finally:
                self.dp.take_upstream(cookie)
        return passed


def _readable(s: socket.socket, secs: float) -> bool:
    """`s` turned readable (its FIN arrived) within `secs`."""
    r, _, _ = select.select([s], [], [], secs)
    return bool(r)
