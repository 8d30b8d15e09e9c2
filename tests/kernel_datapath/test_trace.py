"""HCM tracing on the fast path (bpf_src/dp_xrid.h with -DDP_TRACE=1,
fastpath/tracing.py) vs the model and a real Envoy with the same listener
(random_sampling 30 %, no provider; OUTBOUND, its route's decorator sent
upstream as x-envoy-decorator-operation; a route timeout, the attempt count
and a route header add: the router's lines, in Envoy's order).

The kernel's ids: every one a UUID whose version digit is exactly the
model's decision from its own first 8 hex digits (9 when they % 10000 <
3000, else 4), both digits seen, every request served by the kernel (the
upstream's peer is a pool socket). A request with a trace header
(fastpath.tracing.TRACE_HEADERS) goes to Envoy, counted envoy/trace_header,
and its connection's next request comes back to the kernel; the head the
upstream gets then is Envoy's, the same as without the fast path. What
Envoy does with the digit and those headers: tests/split/test_tracing_envoy.py.

With the Zipkin provider (-DDP_TRACE_ZIPKIN=1): an unsampled request gets the
b3 lines after the route's (x-b3-traceid = x-b3-spanid, 16 hex digits,
x-b3-sampled: 0) from the kernel; a sampled one goes to Envoy with the
kernel's id (envoy/trace_sampled), and the collector gets a span for
exactly those ids; a request with b3 context goes to Envoy.

The destination's inbound listener with tracing (INBOUND, 30 % as the
caller's, a route decorator), merged into the client's plan
(fastpath.inbound_merge.trace_refusal): the app's heads from the kernel
equal those through the real chain outbound Envoy -> inbound Envoy, without
a provider and with Zipkin on both sides (spans: two per sampled id, none
for the kernel's unsampled ones). What the inbound Envoy does:
tests/split/test_tracing_inbound_envoy.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from k2_envoy import EnvoyMaker, ResourcesEnvoy, StaticEnvoy, listener_and_cluster
from k2_plan import load_plan, run_client, split_plan
from test_delay import EchoUpstream
from test_hop import CLIENT

from fastpath.agent import Agent, _cflags
from fastpath.reference import Request, decide_datapath
from fastpath.tracing import (
    SAMPLED_REASON,
    TRACE_HEADERS,
    TRACE_REASON,
    traced_id_pattern,
    version_digit,
    zipkin_forwards,
)
from tests.split.test_request_id_envoy import _wait
from tests.split.test_tracing_envoy import ZIPKIN, Collector
from tests.support.procs import stop_process
from xds_server.ports import pick_free_port

pytestmark = [pytest.mark.kernel, pytest.mark.envoy]

N = 200  # plain requests: each id's digit checked against the model
SAMPLING = 3000  # random_sampling 30 %
TRACED = {"x-request-id": "00000001-1111-4111-8111-111111111111", "x-client-trace-id": "c1",
          "x-envoy-force-trace": "1", "x-envoy-decorator-operation": "op0"}


def resources(port: int, up_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    listener, cluster = listener_and_cluster(  # Envoy sends the decorator upstream (OUTBOUND)
        port, up_port, [{"name": "up", "match": {"prefix": "/"}, "route": {"cluster": "up", "timeout": "7s"},
                         "decorator": {"operation": "op1"}, "request_headers_to_add": [
                             {"header": {"key": "x-r1", "value": "a"}}]}])
    listener["traffic_direction"] = "OUTBOUND"
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0]["include_request_attempt_count"] = True
    hcm["tracing"] = {"random_sampling": {"value": SAMPLING / 100}}
    return listener, cluster


def req(case: str) -> str:
    return f"GET /{case} HTTP/1.1\r\nHost: svc\r\nx-case: {case}\r\n"


# one connection of N plain requests; per trace header, one connection: the
# request with it, then a plain one (back on the kernel path)
SCRIPT = [["SLEEP 0.05", *(req(f"s{i}") + "\r\n" for i in range(N))]] + [
    ["SLEEP 0.05", req(h) + f"{h}: {v}\r\n\r\n", req(f"next-{h}") + "\r\n"] for h, v in TRACED.items()]


@pytest.fixture
def tenvoy(echo: EchoUpstream, resources_envoy: EnvoyMaker) -> ResourcesEnvoy:
    return resources_envoy("trace", resources, echo.port)


def _norm(h: str, r: dict[str, Any]) -> list[tuple[str, str]]:
    """The head with an id Envoy generated as "model" when its version digit is
    the model's sampling decision from it, else as that digit (Envoy's mark:
    b for x-client-trace-id)."""
    def digit(v: str) -> str:
        return "model" if v[14] == version_digit(v, SAMPLING) else v[14]
    return [(k, digit(v)) if k == "x-request-id" and h != k else (k, v) for k, v in r["headers"]]


def _by_case(raw: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {dict(r["headers"])["x-case"]: r for r in raw}


def test_sampled_digit_per_id_and_trace_headers_to_envoy(agent: Agent, cgroup: Any,
                                                         tenvoy: ResourcesEnvoy,
                                                         echo: EchoUpstream) -> None:
    plan = split_plan(tenvoy.listener, tenvoy.cluster)
    assert plan.listeners[0].trace_sampling == SAMPLING and "-DDP_TRACE=1" in _cflags(plan)
    node = load_plan(agent, plan)
    assert node.mode == "l7fp"
    fast = run_client(cgroup, CLIENT, tenvoy.port, SCRIPT)
    time.sleep(0.1)
    seen = _by_case(echo.take())
    kernel = node.stats()
    node.dp.detach_cgroup(cgroup.path)  # the trace-header requests through Envoy only
    via_envoy = run_client(cgroup, CLIENT, tenvoy.port, SCRIPT[1:])
    time.sleep(0.1)
    envoy_seen = _by_case(echo.take())

    assert all(r["status"] == 200 for c in fast for r in c), fast
    assert [[r["status"] for r in c] for c in via_envoy] == [[200, 200]] * len(TRACED)
    pattern = re.compile(traced_id_pattern(SAMPLING))
    digits = {"4": 0, "9": 0}
    for i in range(N):
        r = seen[f"s{i}"]
        assert not r["via_envoy"], r
        heads = r["headers"]
        assert heads[4:] == [("x-envoy-decorator-operation", "op1"), ("x-envoy-expected-rq-timeout-ms", "7000"),
                             ("x-envoy-attempt-count", "1"), ("x-r1", "a")], heads
        # in Envoy's order: its head of a plain request (the same listener, the fast path off)
        assert [k for k, _ in heads] == [k for k, _ in envoy_seen["next-x-request-id"]["headers"]], heads
        rid = dict(heads)["x-request-id"]
        assert pattern.fullmatch(rid) and rid[14] == version_digit(rid, SAMPLING), rid
        digits[rid[14]] += 1
    assert digits["4"] and digits["9"], digits  # both decisions made (p ~ 1e-31 otherwise)
    for h in TRACED:
        assert seen[h]["via_envoy"] and not seen[f"next-{h}"]["via_envoy"], (seen[h], seen[f"next-{h}"])
        # Envoy's head, either way (the id's digit too: Envoy's mark, or its own sample)
        assert _norm(h, seen[h]) == _norm(h, envoy_seen[h]), (h, seen[h]["headers"], envoy_seen[h]["headers"])
    punted = sum(n for (_, outcome, why), n in kernel.items() if (outcome, why) == ("envoy", TRACE_REASON))
    # x-envoy-force-trace and x-envoy-decorator-operation: any x-envoy-* header is
    # Envoy's already at the parse (tests/split/test_stripped_headers_envoy.py)
    ours = [h for h in TRACE_HEADERS if h.startswith("x-envoy-")]
    assert punted == len(TRACE_HEADERS) - len(ours), kernel
    assert kernel.get(("", "envoy", "header_conflict")) == len(ours), kernel


def _zipkin_envoy(envoy_bin: str, tmp_path: Path, up: int, col: int) -> tuple[Any, dict[str, Any],
                                                                           dict[str, Any], int]:
    """Envoy with the traced listener (Zipkin provider, collector `col`), its
    process, listener, upstream cluster and port. The caller stops it."""
    port = pick_free_port()
    listener, cluster = resources(port, up)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["tracing"]["provider"] = ZIPKIN
    collector = {**cluster, "name": "col", "load_assignment": {"cluster_name": "col", "endpoints": [
        {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
            "address": "127.0.0.1", "port_value": col}}}}]}]}}
    cfg = tmp_path / "envoy-zipkin.json"
    cfg.write_text(json.dumps({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": pick_free_port()}}},
        "static_resources": {"listeners": [listener], "clusters": [cluster, collector]},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {
            "tracing.zipkin.min_flush_spans": 1}}]}}))  # each span POSTed at once
    proc = subprocess.Popen([envoy_bin, "-c", str(cfg), "--disable-hot-restart", "--concurrency", "1",
                             "-l", "warning", "--base-id", str(port)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "envoy-zipkin.log", "w"))  # noqa: SIM115
    return proc, listener, cluster, port


ZSCRIPT = [["SLEEP 0.05", *(req(f"z{i}") + "\r\n" for i in range(N // 2))],
           ["SLEEP 0.05", req("b3") + "x-b3-sampled: 1\r\n\r\n", req("next-b3") + "\r\n"]]


def test_zipkin_unsampled_in_kernel_sampled_spans_from_envoy(agent: Agent, cgroup: Any, echo: EchoUpstream,
                                                             envoy_bin: str, tmp_path: Path) -> None:
    col = Collector()
    proc, listener, cluster, port = _zipkin_envoy(envoy_bin, tmp_path, echo.port, col.port)
    try:
        plan = split_plan(listener, cluster)
        assert plan.listeners[0].trace_provider == "zipkin" and "-DDP_TRACE_ZIPKIN=1" in _cflags(plan)
        _wait(port, proc, tmp_path / "envoy-zipkin.log")
        node = load_plan(agent, plan)
        fast = run_client(cgroup, CLIENT, port, ZSCRIPT)
        time.sleep(0.1)
        seen = _by_case(echo.take())
        want = {dict(seen[f"z{i}"]["headers"])["x-request-id"] for i in range(N // 2)}
        want = {rid for rid in want if not zipkin_forwards(rid, SAMPLING)}
        deadline = time.monotonic() + 10
        while not want <= set(col.ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        kernel = node.stats()
    finally:
        stop_process(proc)
        col.close()
    assert all(r["status"] == 200 for c in fast for r in c), fast
    model = decide_datapath(plan, "out", Request("GET", "/z", "svc", (("x-case", "z"),)))
    for i in range(N // 2):
        r = seen[f"z{i}"]
        rid = dict(r["headers"])["x-request-id"]
        heads = [k for k, _ in r["headers"]]
        if zipkin_forwards(rid, SAMPLING):  # the kernel's: the model's lines, b3 after the route's
            assert not r["via_envoy"] and heads == [
                "host", "x-case", *(k for k, _ in model.hcm_added + model.add_headers + model.trace_added)], r
            b3 = dict(r["headers"])
            assert all(re.fullmatch(v, b3[k]) for k, v in model.trace_added), r
            assert b3["x-b3-traceid"] == b3["x-b3-spanid"], r
        else:  # Envoy's, from the kernel's id
            assert r["via_envoy"] and dict(r["headers"])["x-b3-sampled"] == "1", r
        assert rid[14] == version_digit(rid, SAMPLING), rid
    plain = {dict(seen[f"z{i}"]["headers"])["x-request-id"] for i in range(N // 2)}
    assert want and set(col.ids) & plain == want, (want, col.ids)  # a span for exactly those
    nxt = dict(seen["next-b3"]["headers"])["x-request-id"]  # back on the kernel path: sampled or not
    assert seen["b3"]["via_envoy"] and seen["next-b3"]["via_envoy"] == (not zipkin_forwards(nxt, SAMPLING))
    by_reason: dict[str, int] = {}
    for (_, outcome, why), n in kernel.items():
        if outcome == "envoy":
            by_reason[why] = by_reason.get(why, 0) + n
    sampled = len(want) + (not zipkin_forwards(nxt, SAMPLING))
    assert by_reason == {SAMPLED_REASON: sampled, TRACE_REASON: 1}, kernel


IN_OP = "op-in"


def inbound_resources(port: int, up_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The destination's inbound listener "in" (INBOUND, tracing 30 % as the
    caller's, a route decorator, Istio's timeout 0s) to the app at up_port."""
    listener, cluster = listener_and_cluster(port, up_port, [
        {"name": "in", "match": {"prefix": "/"}, "route": {"cluster": "up", "timeout": "0s"},
         "decorator": {"operation": IN_OP}}])
    listener["name"] = "in"
    listener["traffic_direction"] = "INBOUND"
    listener["filter_chains"][0]["filters"][0]["typed_config"]["tracing"] = {
        "random_sampling": {"value": SAMPLING / 100}}
    return listener, cluster


def _at_port(obj: Any, port: int) -> Any:
    """A listener or cluster with every port_value set to `port` (the plans'
    view: the app's address, which a mesh's iptables sends to the inbound
    sidecar; here the Envoys are chained by their own ports)."""
    if isinstance(obj, dict):
        return {k: (port if k == "port_value" else _at_port(v, port)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_at_port(v, port) for v in obj]
    return obj


# one connection of N plain requests, through the kernel and then through both Envoys
ISCRIPT = [["SLEEP 0.05", *(req(f"i{i}") + "\r\n" for i in range(N))]]
B3 = ("x-b3-traceid", "x-b3-spanid", "x-b3-sampled")


def _chain(envoy_bin: str, tmp_path: Path, app: int, col: int | None, stack: contextlib.ExitStack
           ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any], int]:
    """The real chain outbound Envoy (`resources`) -> inbound Envoy
    (`inbound_resources`) -> the app at port `app`, both with the Zipkin
    tracer reporting to `col` when given; their listeners and clusters, the
    outbound one's port. Both Envoys are closed by `stack`."""
    in_port, out_port = pick_free_port(), pick_free_port()
    (inl, inc), (outl, outc) = inbound_resources(in_port, app), resources(out_port, in_port)
    clusters: list[dict[str, Any]] = []
    if col is not None:
        for lis in (inl, outl):
            lis["filter_chains"][0]["filters"][0]["typed_config"]["tracing"]["provider"] = ZIPKIN
        clusters = [_at_port({**inc, "name": "col", "load_assignment": {**inc["load_assignment"],
                                                                       "cluster_name": "col"}}, col)]
    for name, lis, c, port in (("trace-in", inl, inc, in_port), ("trace-out", outl, outc, out_port)):
        cfg = tmp_path / f"envoy-{name}.json"
        cfg.write_text(json.dumps({
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": pick_free_port()}}},
            "static_resources": {"listeners": [lis], "clusters": [c, *clusters]},
            "layered_runtime": {"layers": [{"name": "static", "static_layer": {
                "tracing.zipkin.min_flush_spans": 1}}]}}))  # each span POSTed at once
        stack.callback(StaticEnvoy(envoy_bin, cfg, port, tmp_path / f"envoy-{name}.log").close)
    return inl, inc, outl, outc, out_port


def _same_head(k: dict[str, Any], e: dict[str, Any], zipkin: bool) -> None:
    """The kernel's and the Envoy chain's head of one case: the same lines in
    the same order, the same values but the id and the b3 ids and decision;
    each id's digit (and b3 decision) Envoy's from that id."""
    assert [n for n, _ in k["headers"]] == [n for n, _ in e["headers"]], (k["headers"], e["headers"])
    for (name, kv), (_, ev) in zip(k["headers"], e["headers"], strict=True):
        assert name in ("x-request-id", *B3) or kv == ev, (name, kv, ev)
    for h in (dict(k["headers"]), dict(e["headers"])):
        sampled = version_digit(h["x-request-id"], SAMPLING) == "9"
        assert h["x-request-id"][14] == ("9" if sampled else "4"), h
        if zipkin:
            assert h["x-b3-sampled"] == str(int(sampled)) and h["x-b3-traceid"] == h["x-b3-spanid"], h
    # the kernel forwards all, but a sampled id on a Zipkin listener: Envoy reports its span
    assert not k["via_envoy"] or (zipkin and dict(k["headers"])["x-b3-sampled"] == "1"), k
    assert e["via_envoy"], e


@pytest.mark.parametrize("zipkin", [False, True], ids=["no-provider", "zipkin"])
def test_inbound_tracing_merged_gives_the_app_the_envoy_chains_head(
        zipkin: bool, agent: Agent, cgroup: Any, echo: EchoUpstream, envoy_bin: str, tmp_path: Path) -> None:
    """The destination's tracing inbound listener merged into the client's
    plan (fastpath.inbound_merge.trace_refusal lets it: the caller traces,
    OUTBOUND, the same 30 % and tracer): the app gets from the kernel the
    head it gets through both real Envoys, line by line (the caller's route
    decorator, which the inbound Envoy takes off, dropped;
    x-envoy-expected-rq-timeout-ms too), each id's digit the caller's
    decision from the id, which the inbound Envoy keeps. With Zipkin on both
    sides the unsampled ones get the kernel's b3 lines, the sampled ones go
    to Envoy, and the collector gets their two spans (client, server) each,
    none for the kernel's."""
    col = Collector()
    with contextlib.ExitStack() as stack:
        stack.callback(col.close)
        inl, inc, outl, outc, port = _chain(envoy_bin, tmp_path, echo.port, col.port if zipkin else None, stack)
        plan = split_plan(outl, _at_port(outc, echo.port))
        dest = split_plan(_at_port(inl, echo.port), inc)
        assert plan.listeners[0].trace_provider == dest.listeners[0].trace_provider == ("zipkin" if zipkin else "")
        node = load_plan(agent, plan, up=replace(dest, node_id="up"))
        assert list(node.inbound_plans) == [f"127.0.0.1:{echo.port}"], node.inbound_plans
        fast = run_client(cgroup, CLIENT, port, ISCRIPT)
        time.sleep(0.1)
        seen = _by_case(echo.take())
        ids = [dict(seen[f"i{i}"]["headers"])["x-request-id"] for i in range(N)]
        sampled = [rid for rid in ids if rid[14] == "9"] if zipkin else []
        deadline = time.monotonic() + 10
        while any(col.ids.count(x) < 2 for x in sampled) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)
        spans = list(col.ids)
        node.dp.detach_cgroup(cgroup.path)  # the same requests through both Envoys
        chain = run_client(cgroup, CLIENT, port, ISCRIPT)
        time.sleep(0.1)
        envoy_seen = _by_case(echo.take())

    assert all(r["status"] == 200 for c in fast + chain for r in c), (fast, chain)
    for i in range(N):
        _same_head(seen[f"i{i}"], envoy_seen[f"i{i}"], zipkin)
    assert "x-envoy-decorator-operation" not in dict(seen["i0"]["headers"]), seen["i0"]
    assert {rid[14] for rid in ids} == {"4", "9"}, ids
    assert sorted(spans) == sorted(sampled * 2), (sampled, spans)
