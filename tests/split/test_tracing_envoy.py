"""HCM tracing: the model (fastpath.tracing, fastpath.reference.decide_datapath,
what bpf_src/dp_xrid.h does) against a real Envoy, per listener setting.

One Envoy, one listener per setting, the recording upstream of
test_request_id_envoy. On a KERNEL tracing listener every request without
trace headers must arrive with exactly the model's lines and its id's version
digit exactly the model's decision from that id (per request, ~100 ids per
percentage, not a statistic); each trace header the model hands to Envoy must
indeed make Envoy do something the kernel would not (so the punt is needed);
a setting kept with Envoy must give its reason, and Envoy must do something
else there.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.plan import KernelPlan, Verdict
from fastpath.reference import Request, decide_datapath
from fastpath.request_id import added_headers
from fastpath.split import split_snapshot
from fastpath.tracing import HEX16, TRACE_HEADERS, b3_lines, version_digit, zipkin_forwards
from tests.kernel_datapath.k2_http import ThreadedServer, recv_head
from tests.split.test_request_id_envoy import Recorder, _exchange, _listener, _wait
from tests.support.procs import stop_process
from xds_server.ports import pick_free_port

pytestmark = pytest.mark.envoy

ZIPKIN = {"name": "envoy.tracers.zipkin", "typed_config": {
    "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig", "collector_cluster": "col",
    "collector_endpoint": "/api/v2/spans", "collector_endpoint_version": "HTTP_JSON"}}
ADDS = {"request_headers_to_add": [{"header": {"key": "x-r1", "value": "a"}},
                                   {"header": {"key": "x-r2", "value": "b"}}],
        "route": {"cluster": "up", "timeout": "7s"}}
# the virtual host fields of a listener
VHOST = {"decorated": {"include_request_attempt_count": True}}
# listener -> (HCM settings, listener fields, route fields, the split's reason or "" for KERNEL)
SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]] = {
    "t100": ({"tracing": {}}, {}, {}, ""),
    "t30": ({"tracing": {"random_sampling": {"value": 30}}}, {}, {}, ""),
    "t60o30": ({"tracing": {"random_sampling": {"value": 60}, "overall_sampling": {"value": 30}}},
               {}, {}, ""),
    "zipkin": ({"tracing": {"random_sampling": {"value": 30}, "provider": ZIPKIN}}, {}, ADDS, ""),
    "zipkin_unshared": ({"tracing": {"provider": {**ZIPKIN, "typed_config": {
        **ZIPKIN["typed_config"], "shared_span_context": False}}}}, {}, {}, "sharedSpanContext"),
    "decorated": ({"tracing": {}}, {"traffic_direction": "OUTBOUND"},
                  {"decorator": {"operation": "op1"}, **ADDS}, ""),  # upstream: the model's header add
    "decorated_in": ({"tracing": {}}, {}, {"decorator": {"operation": "op1"}},
                     "route decorator on a tracing listener that is not OUTBOUND"),  # on the response
    "decorated_nop": ({"tracing": {}}, {}, {"decorator": {"operation": "op1", "propagate": False}}, ""),
    "inbound": ({"tracing": {}}, {"traffic_direction": "INBOUND"}, {},
                ""),  # its callers decide: tests/split/test_tracing_inbound_envoy.py
}
SAMPLED = ("t30", "t60o30", "zipkin")  # ~100 plain requests each
N = 100
# a request with each header that hands it to Envoy; the id's r is 1 (< 3000)
TRACED = {"x-request-id": "00000001-1111-4111-8111-111111111111", "x-client-trace-id": "c1",
          "x-envoy-force-trace": "1", "x-envoy-decorator-operation": "op0"}
# trace context: passes as sent without a provider; with Zipkin, to Envoy
PASSING = [("x-b3-traceid", "0000000000000001"), ("x-b3-spanid", "0000000000000002"),
           ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]
# the hand-over of a sampled request: Envoy's b3 lines after it saw the kernel's id
SAMPLED_B3 = (("x-b3-traceid", HEX16), ("x-b3-spanid", HEX16), ("x-b3-sampled", "1"))


class Collector(ThreadedServer):
    """A Zipkin collector: the x-request-id of every span POSTed (JSON v2, the
    tag guid:x-request-id); answers 202. Closed by the test's finally."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        super().__init__()

    def _serve(self, c: socket.socket) -> None:
        buf = b""
        with c:
            while (got := recv_head(c, buf)) is not None:
                _, buf = got
                while b"\r\n0\r\n\r\n" not in buf:  # Envoy's chunked body
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                body, _, buf = buf.partition(b"\r\n0\r\n\r\n")
                self.ids += re.findall(r'"guid:x-request-id":"([0-9a-f-]+)"', body.decode("latin-1"))
                c.sendall(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")


def _resources(up: int, col: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    ports = {name: pick_free_port() for name in SETTINGS}
    listeners = []
    for n, (hcm, lis, route, _) in SETTINGS.items():
        one = {**_listener(n, ports[n], hcm), **lis}
        rc = one["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
        rc["virtual_hosts"][0]["routes"][0].update(route)
        rc["virtual_hosts"][0].update(VHOST.get(n, {}))
        listeners.append(one)
    clusters = [{"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
        for name, port in (("up", up), ("col", col))]
    return listeners, clusters, ports


def _plan(listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> KernelPlan:
    return split_snapshot("n", {em.LISTENER: [em.parse(em.LISTENER, x) for x in listeners],
                                em.CLUSTER: [em.parse(em.CLUSTER, c) for c in clusters]}).plan


def _model(plan: KernelPlan, name: str, lines: list[tuple[str, str]]) -> Any:
    return decide_datapath(plan, name, Request("GET", "/", "svc", (("x-a", "1"), *lines)))


def _fits(got: list[tuple[str, str]], sent: list[tuple[str, str]], added: tuple[tuple[str, str], ...],
          sampling: int | None, b3: tuple[tuple[str, str], ...] = ()) -> bool:
    """The upstream's head is the client's lines then the model's (the id
    matching its pattern, its digit the decision from its own first 8 digits),
    then `b3` (the Zipkin lines: the kernel's for an unsampled id, Envoy's
    for a sampled one; trace id = span id)."""
    if b3:
        rid = dict(got).get("x-request-id", "")
        b3 = SAMPLED_B3 if rid[14:15] == "9" else b3
        ids = dict(got)
        if ids.get("x-b3-traceid") != ids.get("x-b3-spanid"):
            return False
    want = sent + list(added) + list(b3)
    if len(got) != len(want) or any(gk != wk for (gk, _), (wk, _) in zip(got, want, strict=True)):
        return False
    for (k, gv), (_, wv) in zip(got, want, strict=True):
        if k == "x-request-id" and (k, wv) in added:
            if not re.fullmatch(wv, gv) or gv[14] != version_digit(gv, sampling):
                return False
        elif (k, wv) in added + b3 and k != "x-request-id":
            if not re.fullmatch(wv, gv):
                return False
        elif gv != wv:
            return False
    return True


def test_tracing_listeners_sample_as_envoy(envoy_bin: str, tmp_path: Path) -> None:
    up, col = Recorder(), Collector()
    listeners, clusters, ports = _resources(up.port, col.port)
    plan = _plan(listeners, clusters)
    lps = {lp.name: lp for lp in plan.listeners}
    for name, (*_, why) in SETTINGS.items():  # the split's side
        routes = [r for v in lps[name].virtual_hosts for r in v.routes]
        kernel = lps[name].verdict is Verdict.KERNEL and all(r.verdict is Verdict.KERNEL for r in routes)
        assert kernel == (not why), (name, lps[name].reason, [r.reason for r in routes])
        assert why in lps[name].reason + "".join(r.reason for r in routes), (name, lps[name])
    assert [lps[n].trace_sampling for n in ("t100", "t30", "t60o30")] == [10000, 3000, 3000]
    assert [lps[n].trace_provider for n in ("t30", "zipkin", "zipkin_unshared")] == ["", "zipkin", ""]
    cfg = tmp_path / "envoy.json"
    cfg.write_text(json.dumps({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": pick_free_port()}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        # each span POSTed at once (not 5 per POST, every 5 s): the test's Envoy only
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {
            "tracing.zipkin.min_flush_spans": 1}}]}}))
    proc = subprocess.Popen([envoy_bin, "-c", str(cfg), "--disable-hot-restart", "--concurrency", "1",
                             "-l", "warning", "--base-id", str(ports["t30"])],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "envoy.log", "w"))  # noqa: SIM115
    cases: dict[str, tuple[str, list[tuple[str, str]]]] = {}  # path -> (listener, client lines)
    responses: dict[str, dict[str, str]] = {}
    for n in SETTINGS:
        cases[f"/{n}/plain"] = (n, [])
        cases[f"/{n}/passing"] = (n, PASSING)
        for h, v in TRACED.items():
            cases[f"/{n}/{h}"] = (n, [(h, v)])
    for n in SAMPLED:
        cases.update({f"/{n}/s{i}": (n, []) for i in range(N)})
    try:
        _wait(ports["t30"], proc, tmp_path / "envoy.log")
        for path, (n, lines) in cases.items():
            responses[path] = _exchange(ports[n], path, lines)
        want_spans = {dict(up.heads[p])["x-request-id"] for p, (n, _) in cases.items()
                      if n == "zipkin" and p.split("/")[2][0] == "s"
                      and not zipkin_forwards(dict(up.heads[p])["x-request-id"], 3000)}
        deadline = time.monotonic() + 10
        while not want_spans <= set(col.ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)
    finally:
        stop_process(proc)
        up.close()
        col.close()
    # spans exactly for the plain requests the model hands to Envoy as sampled
    plain = {dict(up.heads[p])["x-request-id"] for p, (n, _) in cases.items()
             if n == "zipkin" and p.split("/")[2][0] == "s"}
    assert want_spans and set(col.ids) & plain == want_spans, (len(want_spans), col.ids)
    differs = {n: False for n in SETTINGS}
    digits: dict[str, set[str]] = {n: set() for n in SAMPLED}
    needed = dict.fromkeys((*TRACE_HEADERS, "passing"), False)  # Envoy did what the kernel would not, somewhere
    for path, (n, lines) in cases.items():
        sent = [("host", "svc"), ("x-a", "1"), *lines]
        got = list(up.heads[path])  # x-envoy-expected-rq-timeout-ms included: its place is compared
        d = _model(plan, n, lines)
        # the data path's lines, then the route's (the router's first: fastpath.classify_route)
        added = d.hcm_added + tuple((k, re.escape(v)) for k, v in d.add_headers) if d.kind == "forward" else ()
        same = _fits(got, sent, added, lps[n].trace_sampling, d.trace_added if d.kind == "forward" else ())
        if n in SAMPLED and path.split("/")[2].startswith("s"):
            digits[n].add(dict(got)["x-request-id"][14])
        header = path.split("/")[2]
        if (header in TRACE_HEADERS or (header == "passing" and lps[n].trace_provider)) \
                and not SETTINGS[n][3]:
            # the model hands it to Envoy, and the kernel's forward would differ
            # (an x-envoy-* one, x-envoy-force-trace, is the parser's first: any x-envoy-*)
            want = "x-envoy-* header" if header.startswith("x-envoy-") else "trace_header"
            assert d.kind == "envoy" and d.reason.startswith(want), (path, d)
            kernel_would = added_headers(tuple(sent), lps[n].trace_sampling)
            needed[header] |= not _fits(got, sent, kernel_would, lps[n].trace_sampling,
                                        b3_lines() if lps[n].trace_provider else ())
            continue
        if not SETTINGS[n][3]:
            assert d.kind == "forward" and same, (path, got, sent, d)
        # the kernel passes the upstream's response (no such header) as it is
        differs[n] |= not same or "x-envoy-decorator-operation" in responses[path]
    # Envoy's order of what it adds (the model's, compared above), spelled out
    assert [k for k, _ in up.heads["/decorated/plain"]][4:] == [
        "x-envoy-decorator-operation", "x-envoy-expected-rq-timeout-ms", "x-envoy-attempt-count",
        "x-r1", "x-r2"], up.heads["/decorated/plain"]
    assert [k for k, _ in up.heads["/zipkin/plain"]][4:] == [
        "x-envoy-expected-rq-timeout-ms", "x-r1", "x-r2", "x-b3-traceid", "x-b3-spanid",
        "x-b3-sampled"], up.heads["/zipkin/plain"]
    assert digits == {n: {"4", "9"} for n in SAMPLED}, digits  # both decisions were seen
    assert all(needed.values()), needed
    assert differs == {n: bool(s[3]) for n, s in SETTINGS.items()}, differs
