"""Framing with the plan's decision (l7fp_decide, which takes Content-Length
bodies): kernel replies to requests with a body in the same write or spanning
later writes (the rest of the body is dropped, the connection stays in sync),
split heads (cork), several requests in one write after a kernel reply. Each
script is also sent straight to the real Envoy (same policy: /deny -> 403,
/punt and the rest -> upstream); answers must be the same, and the kernel must
have served what it can."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import pytest
from k2_helpers import client_cmd
from k2_plan import load_plan
from test_agent import (
    Agent,
    ClusterAction,
    KernelPlan,
    WeightedCluster,
    client_plan,
    get,
    route,
    wait_for,
)

from fastpath.plan import LocalRateLimit

pytestmark = [pytest.mark.kernel, pytest.mark.envoy]


def deny(n: int, body: str | None = None) -> str:
    """POST /deny with a Content-Length of n (body: the bytes in this write)."""
    head = f"POST /deny HTTP/1.1\r\nHost: svc\r\nContent-Length: {n}\r\n\r\n"
    return head + ("b" * n if body is None else body)


D = get("/deny/x")
F = get("/fast/n")
P = get("/punt/x")
B3, B300 = deny(3), deny(300)
SCRIPTS: dict[str, tuple[list[dict], list[tuple[str, str]]]] = {  # type: ignore[type-arg]
    # name: (one connection's steps, (request, who serves it) per response)
    "body_same_write": ([{"send": [deny(3)]}, {"send": [F]}], [(B3, "kernel"), (F, "fast")]),
    "body_spans_writes": ([{"send": [deny(10, "b" * 4), "b" * 6], "pause": 0.02},
                           {"send": [F]}], [(deny(10), "kernel"), (F, "fast")]),
    "body_spans_three": ([{"send": [deny(300, "b" * 4), "b" * 200, "b" * 96], "pause": 0.02},
                          {"send": [D]}], [(B300, "kernel"), (D, "kernel")]),
    "body_rest_and_request": ([{"send": [deny(10, "b" * 4), "b" * 6 + F], "pause": 0.02,
                                "expect": 2}], [(deny(10), "kernel"), (F, "fast")]),
    "body_rest_and_split_head": ([{"send": [deny(10, "b" * 4), "b" * 6 + D[:7], D[7:]],
                                   "pause": 0.02, "expect": 2}],
                                 [(deny(10), "kernel"), (D, "kernel")]),
    "big_body_spans": ([{"send": [deny(70000, "b" * 1000), "b" * 69000], "pause": 0.02},
                        {"send": [F]}], [(deny(70000), "kernel"), (F, "fast")]),
    "pipelined_reply_then_fast": ([{"send": [D + F], "expect": 2}, {"send": [F]}],
                                  [(D, "kernel"), (F, "fast"), (F, "fast")]),
    "pipelined_replies_with_body": ([{"send": [D + deny(2) + D + F], "expect": 4}],
                                    [(D, "kernel"), (deny(2), "kernel"), (D, "kernel"),
                                     (F, "fast")]),
    "pipelined_reply_then_envoy": ([{"send": [D + P], "expect": 2}, {"send": [F]}],
                                   [(D, "kernel"), (P, "envoy"), (F, "envoy")]),
    "pipelined_reply_then_body_spans": ([{"send": [D + deny(8, "bbb"), "b" * 5], "pause": 0.02,
                                          "expect": 2}, {"send": [D]}],
                                        [(D, "kernel"), (deny(8), "kernel"), (D, "kernel")]),
    # a split head behind a kernel reply: Envoy, sticky (corking it there too
    # works, but cost the verifier 167k more instructions: docs/fastpath.md)
    "pipelined_reply_then_split_head": ([{"send": [D + F[:7], F[7:]], "pause": 0.02,
                                          "expect": 2}, {"send": [F]}],
                                        [(D, "kernel"), (F, "envoy"), (F, "envoy")]),
    "pipelined_reply_then_split_envoy": ([{"send": [D + P[:9], P[9:]], "pause": 0.02,
                                           "expect": 2}], [(D, "kernel"), (P, "envoy")]),
    "pipelined_fast_first": ([{"send": [F + D], "expect": 2}], [(F, "envoy"), (D, "envoy")]),
    # short writes that cannot become a request: to Envoy at once (400), not corked
    "garbage_short": ([{"send": ["PING\r\n"]}], [("PING\r\n", "envoy")]),
    "garbage_line": ([{"send": ["GET /x\r\n"]}], [("GET /x\r\n", "envoy")]),
}


def answer(r: dict) -> tuple:  # type: ignore[type-arg]
    """What a client can tell apart: status, and the body or the upstream's view."""
    if r["headers"].get("x-served-by"):
        seen = json.loads(r["body"])
        return r["status"], seen["line"], seen["body_len"]
    return r["status"], r["body"]


def served(r: dict) -> str:  # type: ignore[type-arg]
    if r["headers"].get("x-via") == "envoy" or r["headers"].get("server") == "envoy":
        return "envoy"
    return "fast" if r["headers"].get("x-served-by") else "kernel"


def envoy_answers(port: int, reqs: list[str]) -> list:  # type: ignore[type-arg]
    """Each request alone on a fresh connection from outside the cgroup: Envoy's
    answer. (Per request: Envoy answers a direct response before reading the
    request's body, adds `connection: close` and resets the connection, so a
    request after a body can only be compared this way.)"""
    script = [[{"send": [r]}] for r in reqs]
    r = subprocess.run(client_cmd("127.0.0.1", str(port), json.dumps(script)),
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return [c[0] for c in json.loads(r.stdout)]


def limited_plan(envoy_port: int, up_port: int) -> KernelPlan:
    """client_plan plus /rl: to the upstream through a 3-token bucket (the kernel's)."""
    plan = client_plan(envoy_port, up_port)
    lst = plan.listeners[0]
    vh = lst.virtual_hosts[0]
    rl = replace(route("rl", "/rl", ClusterAction((WeightedCluster("up", 100),))),
                 rate_limit=LocalRateLimit(3, 3, 3_600_000))
    vh = replace(vh, routes=(rl, *vh.routes))
    return replace(plan, listeners=(replace(lst, virtual_hosts=(vh,)),))


@pytest.fixture
def l7fp_agent(agent, envoy, upstream):  # type: ignore[no-untyped-def]
    node = load_plan(agent, limited_plan(envoy.port, upstream.port))
    assert node.mode == "l7fp"
    wait_for(lambda: any(p["free"] >= 4 for p in node.pools.snapshot()))
    return agent


def deny_replies(agent: Agent) -> int:
    raw = dict(agent.stats())["client"]
    return sum(n for (r, o, _), n in raw.items() if r.endswith("deny") and o == "kernel_reply")


def test_framing_scripts_match_envoy(l7fp_agent, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    names = sorted(SCRIPTS)
    reqs = sorted({req for n in names for req, _ in SCRIPTS[n][1]})
    ref = dict(zip(reqs, envoy_answers(envoy.port, reqs), strict=True))
    assert not any("/deny" in line for line in upstream.seen)
    scripts = [SCRIPTS[n][0] for n in names]
    r = cgroup.run(client_cmd("127.0.0.1", str(envoy.port), json.dumps(scripts)))
    assert r.returncode == 0, r.stderr[-3000:]
    for name, got in zip(names, json.loads(r.stdout), strict=True):
        want = SCRIPTS[name][1]
        assert [answer(x) for x in got] == [answer(ref[q]) for q, _ in want], name
        assert [served(x) for x in got] == [w for _, w in want], name
    # no denied request (nor its body) reached the upstream; each was counted once
    assert not any("/deny" in line for line in upstream.seen)
    n_deny = sum(1 for n in names for _, w in SCRIPTS[n][1] if w == "kernel")
    assert deny_replies(l7fp_agent) == n_deny


def test_deny_with_body_split_at_every_offset(l7fp_agent, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    """Head cut (cork) or body cut (the rest dropped) at any byte: one kernel 403,
    then the next request on the same connection is answered in sync."""
    req = deny(6)
    conns = [[{"send": [req[:cut], req[cut:]], "pause": 0.005}, {"send": [D]}]
             for cut in range(1, len(req))]
    r = cgroup.run(client_cmd("127.0.0.1", str(envoy.port), json.dumps(conns)))
    assert r.returncode == 0, r.stderr[-3000:]
    for cut, res in enumerate(json.loads(r.stdout), start=1):
        assert [(x["status"], x["body"], served(x)) for x in res] == [
            (403, "RBAC: access denied", "kernel")] * 2, (cut, res)
    assert deny_replies(l7fp_agent) == 2 * (len(req) - 1)
    assert upstream.seen == []


def test_rate_limit_tokens_taken_once_per_request(l7fp_agent, cgroup, envoy, upstream):  # type: ignore[no-untyped-def]
    """A corked head, a request behind a kernel reply, a request behind a dropped
    body: each is decided once, so the 3-token bucket lets exactly 3 through."""
    rl = [get(f"/rl/{i}") for i in range(5)]
    conns = [
        [{"send": [rl[0][:5], rl[0][5:]], "pause": 0.01}],
        [{"send": [D + rl[1]], "expect": 2}],
        [{"send": [deny(6, "bb"), "bbbb" + rl[2]], "pause": 0.01, "expect": 2}],
        [{"send": [rl[3][:20], rl[3][20:]], "pause": 0.01}],
        [{"send": [D + rl[4]], "expect": 2}],
    ]
    r = cgroup.run(client_cmd("127.0.0.1", str(envoy.port), json.dumps(conns)))
    assert r.returncode == 0, r.stderr[-3000:]
    out = [res[-1] for res in json.loads(r.stdout)]  # the /rl answer of each connection
    assert [x["status"] for x in out] == [200, 200, 200, 429, 429], out
    assert [served(x) for x in out] == ["fast"] * 3 + ["kernel"] * 2
    assert out[3]["body"] == "local_rate_limited"
    raw = dict(l7fp_agent.stats())["client"]
    per_rl = {o: n for (name, o, _), n in raw.items() if name.endswith("/rl")}
    assert per_rl == {"fast": 3, "kernel_reply": 2}, raw
    assert sorted(ln for ln in upstream.seen if "/rl/" in ln) == [
        f"GET /rl/{i} HTTP/1.1" for i in range(3)]
