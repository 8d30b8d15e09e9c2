"""An upstream that closes before answering, on KERNEL routes, vs a real Envoy
with the same route config (NAME=reset): Envoy's 503 "upstream connect error or
disconnect/reset before headers. reset reason: connection termination" for a
FIN and for a RST (SO_LINGER 0), on an untimed route (timeout 0s, Istio's) and
a timed one (1 s: answered at once, not at the deadline), the client's
connection still serving its next request, and no 503 when the app closes
after a complete answer. Loopback, unpaired upstreams (sk_skb); the paired way
(dp_srv_verdict) is in tests/kernel_differential/test_reset_mesh.py."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from k2_envoy import EnvoyMaker, ResourcesEnvoy, listener_and_cluster, timed_routes
from k2_http import ThreadedServer, recv_head
from k2_plan import load_plan, run_client, split_plan

from fastpath.agent import Agent
from fastpath.timeouts import RESET_BODY

pytestmark = [pytest.mark.kernel, pytest.mark.envoy]

CLIENT = Path(__file__).with_name("k2_tmo_client.py")


class ClosingUpstream(ThreadedServer):
    """Per request line: `close` reads the request and closes (FIN), `rst`
    closes with SO_LINGER 0 (RST), `bye` answers then closes; anything else is
    answered 200 with the request line as body."""

    def _serve(self, c: socket.socket) -> None:
        buf = b""
        with c:
            while (got := recv_head(c, buf)) is not None:
                head, buf = got
                line = head.split(b"\r\n", 1)[0]
                if b"/close" in line:
                    return
                if b"/rst" in line:
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(line), line))
                if b"/bye" in line:
                    return


def resources(port: int, up_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """/t: a 1 s route timeout; /n: none (0s, as Istio sets it)."""
    return listener_and_cluster(port, up_port, timed_routes("1s"))


@pytest.fixture
def closing() -> Iterator[ClosingUpstream]:
    s = ClosingUpstream()
    yield s
    s.close()


@pytest.fixture
def renvoy(closing: ClosingUpstream, resources_envoy: EnvoyMaker) -> ResourcesEnvoy:
    return resources_envoy("reset", resources, closing.port)


def req(path: str) -> str:
    return f"GET {path} HTTP/1.1\r\nHost: svc\r\n\r\n"


RESETS = [[req(f"/{r}/{how}"), req(f"/{r}/after")] for r in ("n", "t") for how in ("close", "rst")]
SCRIPT = [*RESETS,
          # the app answers, then closes: no request waited, so no 503
          [req("/n/bye"), "SLEEP 0.3", req("/n/after-bye")]]


def test_reset_before_response_matches_envoy(agent: Agent, cgroup: Any, renvoy: ResourcesEnvoy
                                             ) -> None:
    node = load_plan(agent, split_plan(renvoy.listener, renvoy.cluster))
    assert node.mode == "l7fp"
    fast = run_client(cgroup, CLIENT, renvoy.port, SCRIPT)
    node.dp.detach_cgroup(cgroup.path)  # the same requests through Envoy only
    via_envoy = run_client(cgroup, CLIENT, renvoy.port, SCRIPT)

    def seen(r: dict[str, Any]) -> tuple[Any, ...]:
        h = r["headers"]
        return r["status"], r["body"], h.get("content-type"), h.get("content-length"), r["end"]

    for conn_f, conn_e in zip(fast, via_envoy, strict=True):
        assert [seen(r) for r in conn_f] == [seen(r) for r in conn_e], (conn_f, conn_e)
    for (reset, nxt), path in zip(fast[:4], RESETS, strict=True):
        assert reset["status"] == 503 and reset["body"] == RESET_BODY, path
        assert "server" not in reset["headers"], path  # the kernel's answer, not Envoy's
        assert reset["secs"] < 0.8, path  # at once, not at /t's 1 s deadline
        # the connection stays usable: its next request is answered
        assert nxt["status"] == 200 and nxt["body"] == path[1].split("\r\n")[0]
    bye, after = fast[4]
    assert bye["status"] == 200 and "server" not in bye["headers"]
    assert after["status"] == 200 and after["body"] == "GET /n/after-bye HTTP/1.1"
    assert node.resetter.counts["reset_503"] == 4, node.resetter.counts
    assert node.keeper is not None and node.keeper.counts["timeout_504"] == 0
    fast_closes = sum(n for (route, outcome, _), n in node.stats().items()
                      if outcome == "fast" and route.rsplit("/", 1)[-1] in ("none", "timed"))
    assert fast_closes >= 5  # the kernel forwarded the requests it answered
    assert json.dumps(node.debug()["resets"])
