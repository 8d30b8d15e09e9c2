"""Route timeouts on the fast path vs a real Envoy with the same route config
(NAME=timeout): the same answers (504 "upstream request timeout" before the
response started, a cut connection after), the connection usable after a 504,
the late response never reaching the client, the upstream connection closed,
no timer firing for fast answers, and the 15 s default in the plan."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from k2_envoy import EnvoyMaker, ResourcesEnvoy, listener_and_cluster, timed_routes
from k2_plan import load_plan, run_client, split_plan
from k2_slow import SlowServer
from test_agent import wait_for

from fastpath.agent import Agent

pytestmark = [pytest.mark.kernel, pytest.mark.envoy]

CLIENT = Path(__file__).with_name("k2_tmo_client.py")


def resources(port: int, up_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One listener, the same for Envoy and the split: /t 1 s, /n none, /d default."""
    return listener_and_cluster(port, up_port, timed_routes("1s", default=True))


@pytest.fixture
def slow() -> Iterator[SlowServer]:
    s = SlowServer()
    yield s
    s.close()


@pytest.fixture
def tenvoy(slow: SlowServer, resources_envoy: EnvoyMaker) -> ResourcesEnvoy:
    return resources_envoy("timeouts", resources, slow.port)


def req(path: str, **headers: str) -> str:
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return f"GET {path} HTTP/1.1\r\nHost: svc\r\n{extra}\r\n"


def run(cgroup: Any, port: int, script: list[list[str]]) -> list[list[dict[str, Any]]]:
    return run_client(cgroup, CLIENT, port, script)  # type: ignore[no-any-return]


SCRIPT = [
    # too slow: 504, then the same connection serves the next request
    [req("/t/late", x_delay_ms="1600"), req("/t/after")],
    # fast enough: no timer fires
    [req("/t/quick", x_delay_ms="150"), req("/t/again")],
    # no timeout on /n
    [req("/n/slow", x_delay_ms="1300")],
    # HEAD: the response has a Content-Length and no body; it is complete, so
    # nothing fires after the deadline and the connection serves the next one
    [req("/t/head").replace("GET", "HEAD", 1), "SLEEP 1.3", req("/t/next")],
    # a request that sets its own timeout: the kernel hands it to Envoy, which
    # decides (this Envoy ignored the header: 200 after 0.8 s)
    [req("/n/own", x_envoy_upstream_rq_timeout_ms="300", x_delay_ms="800")],
]


def start_plan(agent: Agent, tenvoy: ResourcesEnvoy) -> Any:
    return load_plan(agent, split_plan(tenvoy.listener, tenvoy.cluster))


def test_timeouts_match_envoy(agent: Agent, cgroup: Any, tenvoy: ResourcesEnvoy,
                              slow: SlowServer) -> None:
    node = start_plan(agent, tenvoy)
    assert node.mode == "l7fp"
    # the plan carries every route's timeout; the 15 s default is read from it,
    # not waited for
    assert sorted(node.timeouts.values()) == [1000, 15000]
    names = {node.route_names[r].rsplit("/", 1)[-1]: ms for r, ms in node.timeouts.items()}
    assert names == {"timed": 1000, "dflt": 15000}
    rto = {(k.gen, k.route): v.ms for k, v in node.dp.bpf["dp_rto"].items()}
    assert {ms for (g, _), ms in rto.items() if g == node.gen} == {1000, 15000}

    fast = run(cgroup, tenvoy.port, SCRIPT)
    node.dp.detach_cgroup(cgroup.path)  # the same requests through Envoy only
    via_envoy = run(cgroup, tenvoy.port, SCRIPT)

    for conn_f, conn_e in zip(fast, via_envoy, strict=True):
        assert [(r["status"], r["body"][:40], r["end"]) for r in conn_f] == \
            [(r["status"], r["body"][:40], r["end"]) for r in conn_e], (conn_f, conn_e)
    late, after = fast[0]
    assert late["status"] == 504 and late["body"] == "upstream request timeout"
    assert late["headers"]["content-type"] == "text/plain"
    assert "server" not in late["headers"]  # the kernel answered, not Envoy
    assert 0.9 < late["secs"] < 1.5
    # the late response never reached the client: the next answer is its own
    assert json.loads(after["body"])["line"] == "GET /t/after HTTP/1.1"
    assert fast[1][0]["status"] == 200 and "server" not in fast[1][0]["headers"]
    # the upstream is told the deadline, as Envoy tells it
    for f, e in ((fast[1][0], via_envoy[1][0]), (fast[2][0], via_envoy[2][0])):
        assert json.loads(f["body"])["expected_timeout"] == \
            json.loads(e["body"])["expected_timeout"]
    assert json.loads(fast[1][0]["body"])["expected_timeout"] == "1000"
    assert fast[2][0]["status"] == 200 and fast[2][0]["secs"] > 1.2
    head, nxt = fast[3]
    assert head["status"] == 200 and head["body"] == "" and "server" not in head["headers"]
    assert nxt["status"] == 200 and json.loads(nxt["body"])["line"] == "GET /t/next HTTP/1.1"
    own = fast[4][0]
    assert own["headers"].get("server") == "envoy" and own["status"] == via_envoy[4][0]["status"]
    assert node.keeper is not None and node.keeper.counts["timeout_504"] == 1
    assert node.keeper.counts["timeout_reset"] == 0  # HEAD was complete
    # the upstream connection of the timed-out request was closed, both ways
    wait_for(lambda: sum(1 for e in slow.events if e["kind"] == "late_sent"
                         and "/t/late" in e["line"]) == 2, 5)
    late_conns = {e["conn"] for e in slow.events
                  if e["kind"] == "request" and "/t/late" in e["line"]}
    wait_for(lambda: late_conns <= {e["conn"] for e in slow.ends()}, 5)


def test_response_started_then_stalled_is_cut(agent: Agent, cgroup: Any, tenvoy: ResourcesEnvoy,
                                              slow: SlowServer) -> None:
    """Head sent, body stalls past the deadline: Envoy closes the client
    connection (after its delayed_close_timeout); the kernel path destroys it."""
    node = start_plan(agent, tenvoy)
    script = [[req("/t/stall", x_stall_ms="2500")]]
    fast = run(cgroup, tenvoy.port, script)[0][0]
    node.dp.detach_cgroup(cgroup.path)
    via_envoy = run(cgroup, tenvoy.port, script)[0][0]
    for r in (fast, via_envoy):
        assert r["status"] == 200 and r["body"] == "abc" and r["end"] != "complete", r
    assert via_envoy["end"] == "eof"
    assert fast["end"] in ("eof", "ConnectionAbortedError", "ConnectionResetError")
    assert 0.9 < fast["secs"] < 2.2
    assert node.keeper is not None and node.keeper.counts["timeout_reset"] == 1
