"""Regex path rewrites and prefix_rewrite on the real data path vs a real Envoy with the same
route config (bpf_src/dp_rewrite.h, fastpath/rewrite.py).

The same requests go through the kernel (a client in the agent's cgroup) and
straight to Envoy (the same client outside it); the echo upstream records
the head it got. Compared: the request line, the headers but
x-envoy-expected-rq-timeout-ms (x-forwarded-proto and x-request-id too, a
fresh UUID as "<uuid4>": k2_http.upstream_heads), the body, the response; and the reference model's path and
x-envoy-original-path. Hypothesis draws the paths and queries.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from k2_envoy import EnvoyMaker, ResourcesEnvoy, listener_and_cluster
from k2_http import upstream_heads
from k2_plan import load_plan, run_client, split_plan
from test_delay import EchoUpstream

from fastpath.agent import Agent
from fastpath.plan import Verdict
from fastpath.reference import Request, decide
from fastpath.rewrite_kernel import DpRw

pytestmark = [pytest.mark.kernel, pytest.mark.envoy]

CLIENT = Path(__file__).with_name("k2_tmo_client.py")


def _rw(prefix: str, pattern: str, sub: str, route_more: dict[str, Any] | None = None,
        **more: Any) -> dict[str, Any]:
    return {"name": prefix.strip("/") or "root", "match": {"prefix": prefix},
            "route": {"cluster": "up", "regex_rewrite": {"pattern": {"regex": pattern},
                                                         "substitution": sub}, **(route_more or {})},
            **more}


def resources(port: int, up_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    routes = [
        _rw("/hub/", "^/hub/(.*)", "/\\1", request_headers_to_add=[
            {"header": {"key": "x-added", "value": "yes"}}]),  # corpus: single-page-app
        _rw("/full", "/.*", "/replaced"),  # istiod's Gateway API ReplaceFullPath
        # Istio's routes carry a retry policy: the data path keeps a copy of the rewritten request
        _rw("/retry", "^/retry/(.*)", "/r/\\1", route_more={"retry_policy": {
            "retry_on": "retriable-status-codes", "retriable_status_codes": [503], "num_retries": 2}}),
        _rw("/g", "^/g(.*)$", "/a-much-longer-prefix/\\1"),  # the message grows
        {"name": "api", "match": {"prefix": "/API", "case_sensitive": False},  # prefix_rewrite:
         "route": {"cluster": "up", "prefix_rewrite": "/v2"}},  # the same data path
        {"name": "ex", "match": {"path": "/ex"}, "route": {"cluster": "up", "prefix_rewrite": "/exact"}},
        _rw("/", "^/foo.*$", "/"),  # corpus: cilium; the kernel compares /foo
    ]
    return listener_and_cluster(port, up_port, routes)


@pytest.fixture
def renvoy(echo: EchoUpstream, resources_envoy: EnvoyMaker) -> ResourcesEnvoy:
    return resources_envoy("rewrite", resources, echo.port)


def req(path: str, extra: str = "", body: str = "") -> str:
    method = "POST" if body else "GET"
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"{method} {path} HTTP/1.1\r\nHost: svc\r\nx-case: {path}\r\n{extra}{length}\r\n{body}"


def both_ways(cgroup: Any, port: int, echo: EchoUpstream,
              script: list[list[str]]) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """(kernel responses, Envoy responses, upstream heads of each): the same
    script from inside the cgroup, then from outside it (Envoy only)."""
    fast = run_client(cgroup, CLIENT, port, script)
    time.sleep(0.1)
    up_fast = upstream_heads(echo.take())
    r = subprocess.run([sys.executable, str(CLIENT), "127.0.0.1", str(port), json.dumps(script)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    time.sleep(0.1)
    return fast, json.loads(r.stdout), up_fast, upstream_heads(echo.take())


def shape(resp: list[list[dict[str, Any]]]) -> list[tuple[Any, ...]]:
    return [(x["status"], x["body"], x["end"]) for conn in resp for x in conn]


CASES = [
    ("/hub/x/y?z=1", "", ""), ("/hub/", "", ""), ("/full/a/b?c=/d", "", ""),
    ("/g/x?y", "", ""), ("/foo/bar?q=1", "", ""), ("/foobar", "", ""),
    ("/other/x?foo", "", ""),  # the check fails: the path as is, the header still sent
    ("/g/post", "", "hello world"),  # a body after the changed head
    ("/api/x?q=/api", "", ""), ("/Api", "", ""), ("/ex?z=1", "", ""), ("/retry/a?b", "", ""),
    ("/hub/ka", "Connection: keep-alive\r\nKeep-Alive: 5\r\n", ""),  # dp_hop.h pops them first
    ("/hub/sent", "x-envoy-original-path: /client\r\n", ""),  # Envoy overwrites it: Envoy's
]


def test_rewrites_match_envoy(agent: Agent, cgroup: Any, renvoy: ResourcesEnvoy,
                              echo: EchoUpstream) -> None:
    plan = split_plan(renvoy.listener, renvoy.cluster)
    routes = plan.listeners[0].virtual_hosts[0].routes
    assert [r.verdict for r in routes] == [Verdict.KERNEL] * 7, routes
    node = load_plan(agent, plan)
    assert node.mode == "l7fp"
    leaf = node.dp.bpf["dp_rw"].Leaf  # struct dp_rw as BCC read it from the C
    assert ctypes.sizeof(leaf) == ctypes.sizeof(DpRw)
    assert [getattr(leaf, n).offset for n, _ in DpRw._fields_] == \
        [getattr(DpRw, n).offset for n, _ in DpRw._fields_]
    # one connection: every request after a rewritten one is framed right
    script = [["SLEEP 0.05", *(req(p, x, b) for p, x, b in CASES)]]
    fast, via_envoy, up_fast, up_envoy = both_ways(cgroup, renvoy.port, echo, script)
    assert shape(fast) == shape(via_envoy), (fast, via_envoy)
    for path, _, _ in CASES:
        assert up_fast[path][:3] == up_envoy[path][:3], (path, up_fast[path], up_envoy[path])
    served = {p: not up_fast[p][3] for p, _, _ in CASES}
    # Envoy's: the client's own x-envoy-original-path; the retry route, as a kernel
    # retry needs a paired upstream (the echo here is not in a cgroup of the agent)
    assert served == {p: "x-envoy-original-path" not in x and not p.startswith("/retry")
                      for p, x, _ in CASES}, served
    assert up_fast["/hub/x/y?z=1"][0] == "GET /x/y?z=1 HTTP/1.1"
    assert up_fast["/hub/x/y?z=1"][1][-2:] == [("x-added", "yes"),
                                               ("x-envoy-original-path", "/hub/x/y?z=1")]
    st = node.stats()
    # the client's x-envoy-original-path: Envoy's before any route (a header Envoy overwrites)
    assert st.get(("", "envoy", "header_conflict")) == 1, st
    assert st.get(("out/all/retry", "envoy", "retry_unpaired")) == 1, st


_SEG = st.text(alphabet="abcXYZ09-._~", max_size=8)
_PATH = st.builds(lambda pfx, segs, q: pfx + "/".join(segs) + (f"?{q}" if q is not None else ""),
                  st.sampled_from(["/hub/", "/hub", "/full", "/full/", "/g", "/g/", "/foo", "/foo/",
                                   "/", "/x/", "/api", "/aPi/", "/ex"]),
                  st.lists(_SEG, max_size=4), st.one_of(st.none(), st.text(alphabet="ab=&/?", max_size=10)))


def test_generated_paths_match_envoy_and_model(agent: Agent, cgroup: Any, renvoy: ResourcesEnvoy,
                                               echo: EchoUpstream) -> None:
    plan = split_plan(renvoy.listener, renvoy.cluster)
    load_plan(agent, plan)

    @settings(max_examples=3, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(paths=st.lists(_PATH, min_size=12, max_size=12, unique=True))
    def check(paths: list[str]) -> None:
        script = [["SLEEP 0.05", *(req(p) for p in paths)]]
        fast, via_envoy, up_fast, up_envoy = both_ways(cgroup, renvoy.port, echo, script)
        assert shape(fast) == shape(via_envoy), (fast, via_envoy)
        kernel = 0
        for p in paths:
            assert up_fast[p][:3] == up_envoy[p][:3], (p, up_fast[p], up_envoy[p])
            d = decide(plan, plan.listeners[0].name, Request("GET", p, "svc", (("x-case", p),)))
            if d.kind == "forward":
                line = up_fast[p][0]
                assert line == f"GET {d.path} HTTP/1.1", (p, line, d)
                assert dict(up_fast[p][1]).get("x-envoy-original-path") == \
                    dict(d.add_headers).get("x-envoy-original-path"), (p, up_fast[p], d)
                kernel += not up_fast[p][3]
        assert kernel > 0, up_fast

    check()
