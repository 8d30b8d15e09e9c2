"""Redirect routes on the fast path vs a real Envoy with the same route config
(bpf_src/dp_redir.h, fastpath/agent_redirect.py): the gateway-api example's
scheme redirect (302 to https), a path redirect with response_code 308 and
strip_query, over GET and HEAD and Host/port/query shapes. Same status,
location, content-length / transfer-encoding and body; the upstream never
sees a redirected request, and a request after them on the same connection
still goes through."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from k2_envoy import EnvoyMaker, ResourcesEnvoy, listener_and_cluster
from k2_plan import load_plan, run_client, split_plan
from test_delay import EchoUpstream, by_case

from fastpath.agent import Agent

pytestmark = [pytest.mark.kernel, pytest.mark.envoy]

CLIENT = Path(__file__).with_name("k2_tmo_client.py")


def resources(port: int, up_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    routes = [
        {"name": "https", "match": {"prefix": "/r"}, "redirect": {"scheme_redirect": "https"}},
        {"name": "moved", "match": {"prefix": "/m"}, "redirect": {
            "path_redirect": "/new/place", "strip_query": True,
            "response_code": "PERMANENT_REDIRECT"}},
        {"name": "up", "match": {"prefix": "/"}, "route": {"cluster": "up"}},
    ]
    return listener_and_cluster(port, up_port, routes)


@pytest.fixture
def renvoy(echo: EchoUpstream, resources_envoy: EnvoyMaker) -> ResourcesEnvoy:
    return resources_envoy("redirect", resources, echo.port)


def req(path: str, host: str, method: str = "GET") -> str:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nx-case: {method} {path}\r\n\r\n"


SCRIPT = [
    [req("/r/a?x=1&y=2", "h:80"), req("/r/b", "h:8080"), req("/r/c", "H.Example:443"),
     req("/r/d?q", "svc"), req("/r/h?k=v", "h:80", "HEAD"), req("/after", "svc")],
    [req("/m/x?drop=1", "h:8080"), req("/m/y", "svc", "HEAD"), req("/after2", "svc")],
]
KEYS = ("location", "content-length", "transfer-encoding")


def shape(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["status"], r["end"], r["body"], *(r["headers"].get(k) for k in KEYS))


def test_redirect_matches_envoy(agent: Agent, cgroup: Any, renvoy: ResourcesEnvoy,
                                echo: EchoUpstream) -> None:
    plan = split_plan(renvoy.listener, renvoy.cluster)
    routes = plan.listeners[0].virtual_hosts[0].routes
    assert [(r.name, r.verdict.value) for r in routes] == \
        [("https", "KERNEL"), ("moved", "KERNEL"), ("up", "KERNEL")], routes
    node = load_plan(agent, plan)
    assert node.mode == "l7fp" and "-DDP_REDIR=1" in node.cflags
    fast = run_client(cgroup, CLIENT, renvoy.port, SCRIPT)
    up_fast = by_case(echo.take())
    stats = node.debug()
    kernel = node.stats()  # route counters: popped by the kernel, answered by the agent
    node.dp.detach_cgroup(cgroup.path)  # the same requests through Envoy only
    via_envoy = run_client(cgroup, CLIENT, renvoy.port, SCRIPT)
    time.sleep(0.1)
    up_envoy = by_case(echo.take())

    assert [[shape(r) for r in c] for c in fast] == [[shape(r) for r in c] for c in via_envoy]
    locs = [r["headers"].get("location") for r in fast[0][:5]]
    assert locs == ["https://h/r/a?x=1&y=2", "https://h:8080/r/b", "https://H.Example:443/r/c",
                    "https://svc/r/d?q", "https://h/r/h?k=v"], locs
    assert [r["status"] for r in fast[1]] == [308, 308, 200]
    assert fast[1][0]["headers"]["location"] == "http://h:8080/new/place"
    assert fast[0][4]["headers"].get("transfer-encoding") == "chunked"  # HEAD, as Envoy
    assert all(r["headers"].get("server") == "envoy" and "date" in r["headers"]
               for c in fast for r in c if r["status"] != 200)
    # never upstream, either way; the request after them went through
    assert sorted(up_fast) == sorted(up_envoy) == ["GET /after", "GET /after2"], up_fast
    assert stats["redirects"].get("sent") == 7, stats
    assert sum(n for (_, o, why), n in kernel.items()
               if (o, why) == ("kernel_reply", "redirected")) == 7, kernel
