"""HCM tracing on the destination's inbound listener: the chain client ->
outbound Envoy (OUTBOUND, tracing) -> inbound Envoy (INBOUND, tracing) -> app,
with the real binary, against the kernel path that replaces both Envoys (the
client's plan with the destination's inbound listener merged,
fastpath.inbound_merge; the model's heads: fastpath.reference).

One Envoy process runs both sides of each chain (a listener knows its own
traffic_direction and HCM only; the inbound one sees the outbound one's
request as it would across pods). What the inbound Envoy does, pinned here:

* it keeps the caller's x-request-id and samples it again (the rule:
  docs/split.md "Tracing on the destination's inbound listener"): the digit
  is the caller's decision in "same", "zipkin", "less", the inbound side's
  in "more" and "overall";
* it takes x-envoy-decorator-operation (the caller's route decorator) off the
  request: the app never sees it;
* its route decorator goes on the response, which an OUTBOUND tracing
  caller takes off again ("same", "zipkin"); behind a caller without tracing
  the client gets it ("untraced");
* with Zipkin on both sides the app gets the caller's b3 lines unchanged
  (x-b3-traceid = x-b3-spanid, no x-b3-parentspanid: the server span shares
  the client span's context), and each sampled request's two spans (client,
  server) go to the collector, none for an unsampled one.

So the merge keeps "same", "zipkin" and "less" (the kernel drops the caller's
decorator line; every request's head the model's, the ids' digits the
caller's decision from the id) and refuses "more", "overall" and "untraced" with a
reason; Envoy indeed does there what the kernel would not. About 3 s.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.inbound_merge import merge, merged_name
from fastpath.plan import KernelPlan
from fastpath.reference import Request, decide, decide_datapath
from fastpath.split import split_snapshot
from fastpath.tracing import HEX16, version_digit
from tests.split.test_request_id_envoy import Recorder, _exchange, _listener, _wait
from tests.split.test_tracing_envoy import ZIPKIN, Collector, _fits
from tests.support.procs import stop_process
from xds_server.ports import pick_free_port

pytestmark = pytest.mark.envoy

T30 = {"random_sampling": {"value": 30}}
OUT_ROUTE = {"decorator": {"operation": "op-out"}, "request_headers_to_add": [
    {"header": {"key": "x-r1", "value": "a"}}]}
IN_ROUTE = {"decorator": {"operation": "op-in"}}
AGAIN = "inbound tracing samples the caller's ids again"
# chain -> (outbound tracing or None, outbound route, inbound tracing, inbound
#           route, requests, the merge's refusal or "" when the kernel serves it)
CHAINS: dict[str, tuple[dict[str, Any] | None, dict[str, Any], dict[str, Any], dict[str, Any], int, str]] = {
    "same": (T30, OUT_ROUTE, T30, IN_ROUTE, 120, ""),
    "zipkin": ({**T30, "provider": ZIPKIN}, OUT_ROUTE, {**T30, "provider": ZIPKIN}, IN_ROUTE, 100, ""),
    "less": (T30, {}, {"random_sampling": {"value": 20}}, {}, 60, ""),
    "more": (T30, {}, {"random_sampling": {"value": 60}}, {}, 100, f"{AGAIN}: 6000/10000"),
    "overall": (T30, {}, {**T30, "overall_sampling": {"value": 20}}, {}, 100, f"{AGAIN}: 2000/10000"),
    "untraced": (None, {}, T30, IN_ROUTE, 20, "not an OUTBOUND tracing listener"),
}
# chain -> how many of the 10000 values of r arrive sampled at the app (seen)
ARRIVE = {"same": 3000, "zipkin": 3000, "less": 3000, "more": 6000, "overall": 2000, "untraced": 3000}
APP_PORT = 9080


def _app_ip(i: int) -> str:
    return f"198.18.77.{i + 1}"  # the destination pods' addresses in the plans (never dialled)


def _cluster(name: str, ip: str, port: int) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": ip, "port_value": port}}}}]}]}}


def _side(name: str, port: int, tracing: dict[str, Any] | None, route: dict[str, Any],
          cluster: str, direction: str) -> dict[str, Any]:
    lis = {**_listener(name, port, {"tracing": tracing} if tracing is not None else {}),
           "traffic_direction": direction}
    r = lis["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
    r.update(route)
    r["route"] = {"cluster": cluster, "timeout": "0s"}  # Istio's: no x-envoy-expected-rq-timeout-ms
    return lis


def _chains(up: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, tuple[int, int]]]:
    """Envoy's listeners (out_X -> in_X -> up), its clusters, the ports."""
    listeners, clusters, ports = [], [_cluster("up", "127.0.0.1", up)], {}
    for n, (to, ro, ti, ri, _, _) in CHAINS.items():
        ports[n] = (pick_free_port(), pick_free_port())
        listeners += [_side(f"out_{n}", ports[n][0], to, ro, f"to_{n}", "OUTBOUND"),
                      _side(f"in_{n}", ports[n][1], ti, ri, "up", "INBOUND")]
        clusters.append(_cluster(f"to_{n}", "127.0.0.1", ports[n][1]))
    return listeners, clusters, ports


def _plans(listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]
           ) -> tuple[KernelPlan, dict[str, KernelPlan]]:
    """The client's plan (the out_X listeners, to_X at the app's address) and
    each destination pod's (its in_X listener on the app's port), as a mesh has
    them: the kernel sends to the app, past the inbound sidecar."""
    def parse(kind: str, xs: list[dict[str, Any]]) -> list[Any]:
        return [em.parse(kind, x) for x in xs]

    outs = [x for x in listeners if x["name"].startswith("out_")]
    to = [_cluster(f"to_{n}", _app_ip(i), APP_PORT) for i, n in enumerate(CHAINS)]
    client = split_snapshot("client", {em.LISTENER: parse(em.LISTENER, outs),
                                       em.CLUSTER: parse(em.CLUSTER, to)}).plan
    dests = {}
    for i, n in enumerate(CHAINS):
        lis = next(x for x in listeners if x["name"] == f"in_{n}")
        lis = {**lis, "address": {"socket_address": {"address": _app_ip(i), "port_value": APP_PORT}}}
        dests[_app_ip(i)] = split_snapshot(f"dest-{n}", {em.LISTENER: parse(em.LISTENER, [lis]),
                                                         em.CLUSTER: parse(em.CLUSTER, clusters[:1])}).plan
    return client, dests


def _run(envoy_bin: str, tmp_path: Path, up: Recorder, col: Collector
         ) -> tuple[dict[str, dict[str, str]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Every chain's requests through the real Envoys: the responses' headers
    by path; the listeners and clusters Envoy ran."""
    listeners, clusters, ports = _chains(up.port)
    clusters.append(_cluster("col", "127.0.0.1", col.port))
    cfg = tmp_path / "envoy.json"
    cfg.write_text(json.dumps({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": pick_free_port()}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {
            "tracing.zipkin.min_flush_spans": 1}}]}}))  # each span POSTed at once
    proc = subprocess.Popen([envoy_bin, "-c", str(cfg), "--disable-hot-restart", "--concurrency", "1",
                             "-l", "warning", "--base-id", str(ports["same"][0])],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "envoy.log", "w"))  # noqa: SIM115
    responses = {}
    try:
        _wait(ports["untraced"][1], proc, tmp_path / "envoy.log")
        for n, spec in CHAINS.items():
            for i in range(spec[4]):
                responses[f"/{n}/{i}"] = _exchange(ports[n][0], f"/{n}/{i}", [])
        sampled = {_rid(up, f"/zipkin/{i}") for i in range(CHAINS["zipkin"][4])
                   if _rid(up, f"/zipkin/{i}")[14] == "9"}
        deadline = time.monotonic() + 10
        while any(col.ids.count(x) < 2 for x in sampled) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)
    finally:
        stop_process(proc)
    return responses, listeners, clusters[:1]


def _rid(up: Recorder, path: str) -> str:
    return dict(up.heads[path])["x-request-id"]


def test_inbound_tracing_behind_an_outbound_one(envoy_bin: str, tmp_path: Path) -> None:
    up, col = Recorder(), Collector()
    try:
        responses, listeners, clusters = _run(envoy_bin, tmp_path, up, col)
    finally:
        up.close()
        col.close()
    client, dests = _plans(listeners, clusters)
    merged = merge(client, dests.get)
    sent = [("host", "svc"), ("x-a", "1")]
    for i, (n, (to, _, _, _, count, why)) in enumerate(CHAINS.items()):
        refused = merged.refused.get((_app_ip(i), APP_PORT), "")
        assert (why in refused) if why else not refused, (n, refused)
        paths = [f"/{n}/{k}" for k in range(count)]
        heads = [up.heads[p] for p in paths]
        # what the inbound Envoy does, whatever the kernel does with it
        assert all("x-envoy-decorator-operation" not in dict(h) for h in heads), n
        on_response = [responses[p].get("x-envoy-decorator-operation") for p in paths]
        assert set(on_response) == ({"op-in"} if to is None else {None}), (n, on_response)
        assert all(_rid(up, p)[14] == version_digit(_rid(up, p), ARRIVE[n]) for p in paths), n
        if why:  # the inbound side's own decision: not the caller's for some ids
            caller = 0 if to is None else 3000
            assert any(_rid(up, p)[14] != version_digit(_rid(up, p), caller) for p in paths), n
            continue
        # the kernel path: the model's head (the caller's lines, its route's
        # without the decorator, the inbound route's, b3 last), per request
        d = decide_datapath(merged.plan, f"out_{n}", Request("GET", f"/{n}/0", "svc", (("x-a", "1"),)))
        d_in = decide(merged.plan, merged_name(_app_ip(i), APP_PORT), Request("GET", f"/{n}/0", "svc"))
        assert d.kind == d_in.kind == "forward", (d, d_in)
        added = d.hcm_added + tuple((k, re.escape(v)) for k, v in d.add_headers + d_in.add_headers)
        assert [k for k, _ in d.add_headers] == (["x-r1"] if CHAINS[n][1] is OUT_ROUTE else []), d  # no decorator
        for p, h in zip(paths, heads, strict=True):
            assert _fits(h, sent, added, 3000, d.trace_added), (p, h, added)
    digits = {_rid(up, f"/same/{k}")[14] for k in range(CHAINS["same"][4])}
    assert digits == {"4", "9"}, digits
    zipkin = [dict(up.heads[f"/zipkin/{k}"]) for k in range(CHAINS["zipkin"][4])]
    assert all("x-b3-parentspanid" not in h and re.fullmatch(HEX16, h["x-b3-spanid"])
               and h["x-b3-sampled"] == ("1" if h["x-request-id"][14] == "9" else "0") for h in zipkin)
    sampled = [h["x-request-id"] for h in zipkin if h["x-request-id"][14] == "9"]
    assert sampled and sorted(col.ids) == sorted(sampled * 2), (sampled, col.ids)  # client + server span
