"""Hop-by-hop request headers on the fast path vs a real Envoy with the same
route config (bpf_src/dp_hop.h, fastpath/hop.py).

Per case, one connection: the case's request, then a plain one. Compared fast
path vs Envoy: the head the upstream received (minus
x-envoy-expected-rq-timeout-ms, which Envoy adds on these untimed routes;
x-forwarded-proto and x-request-id compared too, in place, a fresh UUID v4 as
"<uuid4>": bpf_src/dp_xrid.h), status and body of both responses, and
whether the second request was answered (Envoy closes the client's connection
after a `Connection: close` request). Also: which cases the kernel served (the
upstream's peer was an agent's pool socket) and the envoy/<reason> counters
of the others.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from k2_envoy import EnvoyMaker, ResourcesEnvoy, listener_and_cluster
from k2_http import upstream_heads
from k2_plan import load_plan, run_client, split_plan
from test_delay import EchoUpstream

from fastpath.agent import Agent
from fastpath.request_id import UUID4

pytestmark = [pytest.mark.kernel, pytest.mark.envoy]

CLIENT = Path(__file__).with_name("k2_tmo_client.py")
CLIENT_SPLIT = Path(__file__).with_name("k2_client.py")  # writes in pieces


def resources(port: int, up_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    routes = [
        {"name": "direct", "match": {"prefix": "/d"},
         "direct_response": {"status": 200, "body": {"inline_string": "kernel says hi"}}},
        {"name": "lim", "match": {"prefix": "/l"},
         "direct_response": {"status": 429, "body": {"inline_string": "slow down"}}},
        {"name": "add", "match": {"prefix": "/a"}, "route": {"cluster": "up"},
         "request_headers_to_add": [{"header": {"key": "x-added", "value": "yes"},
                                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]},
        {"name": "up", "match": {"prefix": "/"}, "route": {"cluster": "up"}},
    ]
    return listener_and_cluster(port, up_port, routes)


# (case, path, extra header lines, body, served by the kernel)
CASES = [
    ("plain", "/u", "", "", True),
    ("requests", "/u", "Accept-Encoding: gzip, deflate\r\nAccept: */*\r\n"
     "Connection: keep-alive\r\n", "", True),
    ("ka-both", "/u", "Connection: Keep-Alive\r\nKeep-Alive: timeout=5, max=100\r\n", "", True),
    ("proxy-ka", "/u", "Proxy-Connection: keep-alive\r\n", "", True),
    ("keep-alive-hdr", "/u", "Keep-Alive: 300\r\nx-after: 1\r\n", "", True),
    ("te-trailers", "/u", "TE: trailers\r\n", "", True),
    ("three", "/u", "Connection: keep-alive\r\nx-mid: 2\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
     "Proxy-Connection: KEEP-ALIVE\r\n", "", True),
    ("post", "/u", "Connection: keep-alive\r\nContent-Length: 11\r\n", "hello world", True),
    ("add", "/a", "Connection: keep-alive\r\nKeep-Alive: 1\r\n", "", True),
    ("direct-ka", "/d", "Connection: keep-alive\r\n", "", True),
    # the client's own x-request-id / x-forwarded-proto: kept as sent (dp_xrid.h)
    ("rid-kept", "/u", "X-Request-Id: client-id-1\r\nx-after: 1\r\n", "", True),
    ("xfp-kept", "/a", "x-forwarded-proto: https\r\n", "", True),
    ("both-kept", "/u", "x-forwarded-proto: https\r\nx-request-id: 0\r\n", "", True),
    ("close", "/u", "Connection: close\r\n", "", False),
    ("proxy-close", "/u", "Proxy-Connection: Close\r\n", "", False),
    ("direct-close", "/d", "Connection: close\r\n", "", False),
    ("nominate", "/u", "Connection: x-foo\r\nx-foo: bar\r\n", "", False),
    ("ka-close", "/u", "Connection: keep-alive, close\r\n", "", False),
    ("te-gzip", "/u", "TE: gzip, trailers\r\n", "", False),
    ("four", "/u", "Connection: keep-alive\r\nKeep-Alive: 5\r\nProxy-Connection: keep-alive\r\n"
     "Keep-Alive: 6\r\n", "", False),
]


def req(case: str, path: str, extra: str, body: str) -> str:
    return f"GET {path}/{case} HTTP/1.1\r\nHost: svc\r\nx-case: {case}\r\n{extra}\r\n{body}" \
        if not body else \
        f"POST {path}/{case} HTTP/1.1\r\nHost: svc\r\nx-case: {case}\r\n{extra}\r\n{body}"


# the pause lets the agent refill the pool the previous connection took from
SCRIPT = [["SLEEP 0.05", req(c, p, x, b), f"GET /u/next-{c} HTTP/1.1\r\nHost: svc\r\nx-case: next-{c}\r\n\r\n"]
          for c, p, x, b, _ in CASES]


@pytest.fixture
def henvoy(echo: EchoUpstream, resources_envoy: EnvoyMaker) -> ResourcesEnvoy:
    return resources_envoy("hop", resources, echo.port)


def shape(conn: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Per response: status, body, answered in full (not: the connection was
    closed before the second request was answered)."""
    return [(r["status"], r["body"], r["end"] == "complete") for r in conn]


def test_hop_by_hop_matches_envoy(agent: Agent, cgroup: Any, henvoy: ResourcesEnvoy,
                                  echo: EchoUpstream) -> None:
    plan = split_plan(henvoy.listener, henvoy.cluster)
    routes = plan.listeners[0].virtual_hosts[0].routes
    assert [r.verdict.value for r in routes] == ["KERNEL"] * 4, routes
    node = load_plan(agent, plan)
    assert node.mode == "l7fp"
    fast = run_client(cgroup, CLIENT, henvoy.port, SCRIPT)
    time.sleep(0.1)
    raw = echo.take()
    up_fast = upstream_heads(raw)
    kernel = node.stats()
    node.dp.detach_cgroup(cgroup.path)  # the same requests through Envoy only
    via_envoy = run_client(cgroup, CLIENT, henvoy.port, SCRIPT)
    time.sleep(0.1)
    up_envoy = upstream_heads(echo.take())

    names = [c[0] for c in CASES]
    assert [shape(c) for c in fast] == [shape(c) for c in via_envoy], \
        list(zip(names, fast, via_envoy, strict=True))
    for case, *_ in CASES:  # what reached the upstream: the same head, either way
        for key in (case, f"next-{case}"):
            assert (up_fast.get(key) or ())[:3] == (up_envoy.get(key) or ())[:3], \
                (key, up_fast.get(key), up_envoy.get(key))
    # Envoy closed the connection after each Connection: close request, both ways
    closing = {"close", "proxy-close", "direct-close", "ka-close"}
    assert [n for n, c in zip(names, via_envoy, strict=True) if c[-1]["end"] != "complete"] == \
        [n for n in names if n in closing], via_envoy
    served = {c: not up_fast[c][3] for c, _, _, _, k in CASES if c in up_fast}
    assert served == {c: k for c, p, _, _, k in CASES if p != "/d"}, served
    hcm = [("x-forwarded-proto", "http"), ("x-request-id", "<uuid4>")]
    assert up_fast["three"][1] == [("host", "svc"), ("x-case", "three"), ("x-mid", "2"),
                                   ("te", "trailers"), *hcm], up_fast["three"]
    assert up_fast["add"][1][-3:] == [*hcm, ("x-added", "yes")], up_fast["add"]
    assert up_fast["rid-kept"][1][2:] == [("x-request-id", "client-id-1"), ("x-after", "1"),
                                          ("x-forwarded-proto", "http")], up_fast["rid-kept"]
    assert up_fast["xfp-kept"][1][2:] == [("x-forwarded-proto", "https"), hcm[1],
                                          ("x-added", "yes")], up_fast["xfp-kept"]
    assert up_fast["both-kept"][1][2:] == [("x-forwarded-proto", "https"),
                                           ("x-request-id", "0")], up_fast["both-kept"]
    ids = [v for r in raw if not r["via_envoy"] for k, v in r["headers"]
           if k == "x-request-id" and UUID4.fullmatch(v)]
    assert len(ids) >= 20 and len(set(ids)) == len(ids), ids  # a fresh one per request
    by_reason: dict[str, int] = {}
    for (_, outcome, why), n in kernel.items():
        if outcome == "envoy" and why in ("conn_close", "hop_header"):
            by_reason[why] = by_reason.get(why, 0) + n
    assert by_reason == {"conn_close": 3, "hop_header": 4}, kernel
    assert sum(n for (r, o, _), n in kernel.items() if (r, o) == ("out/all/direct", "kernel_reply")) == 1


SPLIT_HEAD = ("GET /u/split HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive\r\nx-case: {}\r\n"
              "Keep-Alive: 5\r\n\r\n")


def test_removal_in_corked_heads_and_rest_runs(agent: Agent, cgroup: Any,
                                               henvoy: ResourcesEnvoy,
                                               echo: EchoUpstream) -> None:
    """The lines are removed at the right offsets when the head came in pieces
    (corked, decided whole) and when the request is the rest of a write whose
    first request the kernel answered (a rest run: offsets from the rest); a
    kernel 429 with Connection: close stays in the kernel."""
    node = load_plan(agent, split_plan(henvoy.listener, henvoy.cluster))
    script = []
    for cut in (5, 30, 45, 52, 80):  # request line, Connection name / value, x-case, blank line
        head = SPLIT_HEAD.format(f"cut{cut}")
        script.append([{"send": [head[:cut], head[cut:]], "pause": 0.01}])
    rest = SPLIT_HEAD.format("rest").replace("/u/split", "/u/rest")
    script.append([{"send": ["GET /d/x HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive\r\n\r\n"
                             + rest], "expect": 2}])
    # a kernel 429 stays in the kernel even with Connection: close (its bucket,
    # were it a rate limit, is the kernel's: Envoy's copy is off)
    script.append([{"send": ["GET /l/x HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"]}])
    out = run_client(cgroup, CLIENT_SPLIT, henvoy.port, script)
    time.sleep(0.1)
    seen = upstream_heads(echo.take())
    assert [r["status"] for c in out for r in c] == [200] * 7 + [429], out
    assert out[-2][0]["body"] == "kernel says hi", out[-2]
    for case in [f"cut{c}" for c in (5, 30, 45, 52, 80)] + ["rest"]:
        line, hdrs, _, via_envoy = seen[case]
        assert not via_envoy and hdrs == [("host", "svc"), ("x-case", case), ("x-forwarded-proto", "http"),
                                          ("x-request-id", "<uuid4>")], (case, seen[case])
    st = node.stats()
    assert st.get(("out/all/lim", "kernel_reply", "")) == 1, st
    assert st.get(("out/all/up", "fast", "")) == 6 and \
        not any(why in ("conn_close", "hop_header") for (_, _, why) in st), st


def test_inline_decision_hands_them_to_envoy(datapath, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    """The built-in decision (the fallback when a plan's program does not load)
    removes nothing: every request with a hop-by-hop header goes to Envoy."""
    from test_framing import served
    from test_plumbing import get, run, setup_plan, stats

    ups = setup_plan(datapath, envoy.port, upstream)
    datapath.attach_cgroup(cgroup.path)
    extras = ["Keep-Alive: 5\r\n", "Proxy-Connection: keep-alive\r\n", "TE: trailers\r\n",
              "Connection: keep-alive\r\n", ""]
    out = run(cgroup, envoy.port, [[{"send": [get("/fast/h", x)]}] for x in extras])
    assert [served(c[0]) for c in out] == ["envoy"] * 4 + ["fast"], out
    assert sum(n for (_, o, why), n in stats(datapath).items() if (o, why) == (2, 19)) == 3
    for s in ups:
        s.close()
