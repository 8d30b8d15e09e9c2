"""An app that closes in the middle of a response, on KERNEL routes, vs a real
Envoy with the same route config (NAME=close). Envoy 1.40 closes the client's
connection (FIN, about 1 s after the app's close) when the response started
and was not complete (Content-Length or chunked; the app's FIN or RST), and
keeps it when the response was complete. The fast path (fastpath/agent_close.py,
bpf_src/dp_close.h) gives the client the bytes that came, then EOF, and keeps
the connection after a complete response. Loopback, unpaired upstreams
(sk_skb); the paired way (dp_srv_verdict) is in
tests/kernel_differential/test_reset_mesh.py."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from k2_envoy import EnvoyMaker, ResourcesEnvoy, listener_and_cluster, timed_routes
from k2_http import ThreadedServer, recv_head
from k2_plan import load_plan, run_client, split_plan

from fastpath.agent import Agent

pytestmark = [pytest.mark.kernel, pytest.mark.envoy]

CLIENT = Path(__file__).with_name("k2_tmo_client.py")

# what the app writes for a request whose path ends in the key, then it closes
PARTIAL = {
    "clpart": b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhalf",
    "clfull": b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nfull",
    "chpart": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nhalf\r\n",
    "headfull": b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
    "chfull": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nfull\r\n0\r\n\r\n",
    # whole, but its head is over DP_RESP_HEAD (512): no tracked end, taken as ended by the close
    "bigfull": b"HTTP/1.1 200 OK\r\nx-pad: " + b"p" * 600 + b"\r\ncontent-length: 4\r\n\r\nfull",
}


class MidCloseUpstream(ThreadedServer):
    """Per request: a path ending in a PARTIAL key gets those bytes, then the
    connection closes (FIN; `-rst` after the key: RST); `/split/...` writes
    the head and the body's start in two writes first; anything else is
    answered 200 with the request line as body."""

    def _serve(self, c: socket.socket) -> None:
        buf = b""
        with c:
            while (got := recv_head(c, buf)) is not None:
                head, buf = got
                line = head.split(b"\r\n", 1)[0]
                last = line.split()[1].rsplit(b"/", 1)[-1].decode()
                kind = last.removesuffix("-rst")
                if kind in PARTIAL:
                    data = PARTIAL[kind]
                    if b"/split/" in line:  # head, then body: the countdown's later write
                        cut = data.index(b"\r\n\r\n") + 4
                        c.sendall(data[:cut])
                        time.sleep(0.05)
                        data = data[cut:]
                    c.sendall(data)
                    time.sleep(0.1)  # the client has the bytes before the close
                    if last.endswith("-rst"):
                        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(line), line))


def resources(port: int, up_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """/n: no route timeout (0s, as Istio sets it); /t: 5 s (the route timer
    must not be what closes)."""
    return listener_and_cluster(port, up_port, timed_routes("5s"))


@pytest.fixture
def midclose() -> Iterator[MidCloseUpstream]:
    s = MidCloseUpstream()
    yield s
    s.close()


@pytest.fixture
def cenvoy(midclose: MidCloseUpstream, resources_envoy: EnvoyMaker) -> ResourcesEnvoy:
    return resources_envoy("close", resources, midclose.port)


def req(path: str, method: str = "GET") -> str:
    return f"{method} {path} HTTP/1.1\r\nHost: svc\r\n\r\n"


CUT = [[req(p), req("/n/after")] for p in
       ("/n/clpart", "/n/clpart-rst", "/n/chpart", "/n/split/clpart", "/t/clpart", "/t/chpart")]
WHOLE = [[req(p, m), "SLEEP 0.3", req("/n/after-whole")] for p, m in
         (("/n/clfull", "GET"), ("/n/split/clfull", "GET"), ("/t/clfull", "GET"),
          ("/n/headfull", "HEAD"), ("/n/chfull", "GET"), ("/n/split/chfull", "GET"))]
SCRIPT = CUT + WHOLE


def test_close_in_response_matches_envoy(agent: Agent, cgroup: Any, cenvoy: ResourcesEnvoy
                                         ) -> None:
    """Cut responses: the bytes, then EOF; whole ones (Content-Length, HEAD,
    chunked with its last chunk, in one write or two): the connection kept."""
    node = load_plan(agent, split_plan(cenvoy.listener, cenvoy.cluster))
    assert node.mode == "l7fp"
    fast = run_client(cgroup, CLIENT, cenvoy.port, SCRIPT)
    node.closer.drain()  # the worker counts an EOF after its FIN passed
    closes = dict(node.closer.counts)
    node.dp.detach_cgroup(cgroup.path)  # the same requests through Envoy only
    via_envoy = run_client(cgroup, CLIENT, cenvoy.port, SCRIPT)

    def seen(r: dict[str, Any]) -> tuple[Any, ...]:
        h = r["headers"]
        return r["status"], r["body"], h.get("content-length"), r["end"]

    for conn_f, conn_e, script in zip(fast, via_envoy, SCRIPT, strict=True):
        assert [seen(r) for r in conn_f] == [seen(r) for r in conn_e], (script, conn_f, conn_e)
    for conn, script in zip(fast[:len(CUT)], CUT, strict=True):
        cut = conn[0]
        assert len(conn) == 1 and cut["end"] == "eof", (script, conn)  # closed, as by Envoy
        assert "server" not in cut["headers"], script  # the kernel path served it
        assert cut["secs"] < 0.8, (script, cut)  # at the app's close, not at a deadline
    for conn, script in zip(fast[len(CUT):], WHOLE, strict=True):
        assert [r["end"] for r in conn] == ["complete", "complete"], (script, conn)
        assert conn[1]["body"] == "GET /n/after-whole HTTP/1.1", (script, conn)
    assert closes["close_eof"] == len(CUT), closes
    assert node.resetter.counts["reset_503"] == 0, node.resetter.counts
    assert node.keeper is not None and node.keeper.counts["timeout_reset"] == 0


# the whole big-head response, the app's close, then the client's next
# requests on the same connection (Envoy keeps it)
MOVED_ON = [[req("/n/bigfull"), "SLEEP 1.0", req("/n/after-big"), "SLEEP 0.3",
             req("/n/after-big2")]]


def test_eof_skipped_when_the_client_sent_its_next_request(
        agent: Agent, cgroup: Any, cenvoy: ResourcesEnvoy, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """A whole response the close is taken to end (head over 512 bytes): its
    client sends its next request before its EOF leaves the worker's queue
    (held here behind another EOF, as behind FINs that do not pass, until the
    event thread sees the client's DP_EV_CLOSE: its request found the cut
    upstream gone and went to Envoy). The worker skips that EOF: the client's
    requests are answered as through Envoy, none cut by a late EOF."""
    import threading

    node = load_plan(agent, split_plan(cenvoy.listener, cenvoy.cluster))
    closer = node.closer
    hold, send, moved_on = threading.Event(), closer.send_eof, closer.moved_on
    first = 1  # a cookie no socket has: the EOF the queue is backed up behind

    def held_send(client: int) -> bool:
        if client == first:
            hold.wait(20)
            return False
        return send(client)

    def seen(client: int) -> None:
        moved_on(client)
        hold.set()  # the worker goes on once the event thread saw the client

    monkeypatch.setattr(closer, "send_eof", held_send)
    monkeypatch.setattr(closer, "moved_on", seen)
    closer._queue_eof(first, "close_eof")
    fast = run_client(cgroup, CLIENT, cenvoy.port, MOVED_ON)
    assert hold.is_set()  # the client's DP_EV_CLOSE was seen (not the 20 s bound)
    closer.drain()
    closes = dict(closer.counts)
    node.dp.detach_cgroup(cgroup.path)
    via_envoy = run_client(cgroup, CLIENT, cenvoy.port, MOVED_ON)

    def seen_by_client(conn: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(r["status"], r["body"], r["end"]) for r in conn]

    assert seen_by_client(fast[0]) == seen_by_client(via_envoy[0]), (fast, via_envoy)
    assert [r["end"] for r in fast[0]] == ["complete"] * 3, fast
    assert "server" not in fast[0][0]["headers"], fast  # the kernel path served the first
    assert closes == {"close_eof": 0, "close_failed": 1, "close_after_reply": 0,
                      "close_skipped": 1}, closes


LRL = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
ENABLED = {"default_value": {"numerator": 100}}


def reply_resources(port: int, up_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A kernel reply of each kind: direct responses (200, 429), a redirect, a
    fault abort, a local rate limit of one token (the kernel owns the bucket)."""
    limit = {"@type": LRL, "stat_prefix": "close_l", "filter_enabled": ENABLED,
             "filter_enforced": ENABLED,
             "token_bucket": {"max_tokens": 1, "tokens_per_fill": 1, "fill_interval": "3600s"}}
    routes = [
        {"name": "direct", "match": {"prefix": "/d"},
         "direct_response": {"status": 200, "body": {"inline_string": "hi"}}},
        {"name": "d429", "match": {"prefix": "/q"},
         "direct_response": {"status": 429, "body": {"inline_string": "slow down"}}},
        {"name": "redir", "match": {"prefix": "/r"}, "redirect": {"path_redirect": "/new"}},
        {"name": "lim", "match": {"prefix": "/l"}, "route": {"cluster": "up"},
         "typed_per_filter_config": {"envoy.filters.http.local_ratelimit": limit}},
        {"name": "fault", "match": {"prefix": "/f"}, "route": {"cluster": "up"},
         "typed_per_filter_config": {"envoy.filters.http.fault": {
             "@type": FAULT, "abort": {"http_status": 503, "percentage": {"numerator": 100}}}}},
        {"name": "up", "match": {"prefix": "/"}, "route": {"cluster": "up"}},
    ]
    filters = ({"name": "envoy.filters.http.fault", "typed_config": {"@type": FAULT}},
               {"name": "envoy.filters.http.local_ratelimit",
                "typed_config": {"@type": LRL, "stat_prefix": "close_lrl"}})
    return listener_and_cluster(port, up_port, routes, filters)


@pytest.fixture
def renvoy(midclose: MidCloseUpstream, resources_envoy: EnvoyMaker) -> ResourcesEnvoy:
    return resources_envoy("close_reply", reply_resources, midclose.port)


def close_req(path: str) -> str:
    return f"GET {path} HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"


# per kind: the `Connection: close` request, a pause (Envoy's FIN comes after
# its delayed_close_timeout, 1 s), then a request that a closed connection
# does not answer; /l: a plain request takes its one token first (the kernel's
# bucket on the fast path, Envoy's through Envoy), then the 429
KINDS = ["/d", "/q", "/r", "/f", "/l"]
REPLY_SCRIPT = [["SLEEP 0.05", *([req("/l/token")] if p == "/l" else []), close_req(p),
                 "SLEEP 1.2", req("/n/next")] for p in KINDS]


def test_kernel_replies_to_connection_close_match_envoy(
        agent: Agent, cgroup: Any, renvoy: ResourcesEnvoy) -> None:
    plan = split_plan(renvoy.listener, renvoy.cluster)
    node = load_plan(agent, plan)
    assert node.mode == "l7fp"
    fast = run_client(cgroup, CLIENT, renvoy.port, REPLY_SCRIPT)
    node.closer.drain()  # the worker counts an EOF after its FIN passed
    closes = dict(node.closer.counts)
    stats = node.stats()
    node.dp.detach_cgroup(cgroup.path)  # the same requests through Envoy only
    via_envoy = run_client(cgroup, CLIENT, renvoy.port, REPLY_SCRIPT)

    def shape(conn: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        """status, body, answered in full: the second request is not (closed)."""
        return [(r["status"], r["body"], r["end"] == "complete") for r in conn]

    for conn_f, conn_e, path in zip(fast, via_envoy, KINDS, strict=True):
        assert shape(conn_f) == shape(conn_e), (path, conn_f, conn_e)
        for conn in (conn_e, conn_f):  # Envoy's header, also in the kernel's 429
            assert conn[-2]["headers"].get("connection") == "close", (path, conn)
        assert conn_f[-1]["status"] == 0, (path, conn_f)  # closed: not answered
    limited = fast[-1][1]
    assert limited["status"] == 429 and "server" not in limited["headers"], limited  # the kernel's
    # the limit's 429 and the 429 direct response (the kernel keeps any 429)
    assert closes["close_after_reply"] == 2, closes
    assert "server" not in fast[1][0]["headers"], fast[1]
    conn_close = sum(n for (_r, outcome, why), n in stats.items()
                     if outcome == "envoy" and why == "conn_close")
    assert conn_close == 3, stats  # direct 200, redirect, fault abort: Envoy answers and closes
