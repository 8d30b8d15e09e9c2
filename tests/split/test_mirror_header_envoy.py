"""Envoy 1.40's `cluster_header` mirroring, seen with the real binary, is what the
reference model (and so the agent, fastpath.mirror.header_cluster) does.

One Envoy: route /h/ forwards to `c0` and mirrors by two headers (`x-mc`, and
`x-mc2` without the host suffix); clusters `ca`, `cb` (recording upstreams),
`empty` (no endpoints), `orig` (ORIGINAL_DST). Per request (header naming ca,
cb, an unknown cluster, none, empty, twice, with spaces, in upper case, a
comma-joined value, the empty and ORIGINAL_DST clusters, both headers): the
clusters that got a shadow are the model's `Decision.mirrors` (the header
twice: the model hands it to Envoy, which takes the first value), the
shadow keeps the header, and the route is KERNEL in the split's plan.
The kernel path against Envoy: tests/kernel_mirror (mesh, `H_CASES`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.plan import Verdict
from fastpath.reference import Request, decide
from tests.split.harness import EnvoyProc, bootstrap_plan, free_ports, http_request

pytestmark = [pytest.mark.envoy]

CASES: list[tuple[tuple[str, str], ...]] = [
    (("x-mc", "ca"),), (("x-mc", "cb"),), (("x-mc", "nosuch"),), (), (("x-mc", ""),),
    (("x-mc", "cb"), ("x-mc", "ca")), (("x-mc", "  ca  "),), (("x-mc", "CA"),),
    (("x-mc", "ca,cb"),), (("x-mc", "empty"),), (("x-mc", "orig"),), (("x-mc", "c0"),),
    (("x-mc", "cb"), ("x-mc2", "ca")), (("x-mc2", "cb"),),
]


def _recorder(name: str, got: list[tuple[str, dict[str, str]]]) -> type[BaseHTTPRequestHandler]:
    class Rec(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            got.append((name, {k.lower(): v for k, v in self.headers.items()}))
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(name.encode()[:2].ljust(2))

        def log_message(self, *args: Any) -> None:
            pass

    return Rec


@pytest.fixture
def recorders() -> Iterator[tuple[dict[str, int], list[tuple[str, dict[str, str]]]]]:
    got: list[tuple[str, dict[str, str]]] = []
    servers, ports = [], {}
    for name in ("c0", "ca", "cb"):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _recorder(name, got))
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        ports[name] = srv.server_address[1]
    yield ports, got
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _cluster(name: str, port: int | None) -> dict[str, Any]:
    eps = [{"lbEndpoints": [{"endpoint": {"address": {"socketAddress": {
        "address": "127.0.0.1", "portValue": port}}}}]}] if port else []
    return {"name": name, "type": "STATIC", "connectTimeout": "1s",
            "loadAssignment": {"clusterName": name, "endpoints": eps}}


def bootstrap(port: int, admin: int, ups: dict[str, int]) -> dict[str, Any]:
    route = {"name": "h", "match": {"prefix": "/h/"}, "route": {
        "cluster": "c0", "timeout": "0s", "requestMirrorPolicies": [
            {"clusterHeader": "x-mc"},
            {"clusterHeader": "x-mc2", "disableShadowHostSuffixAppend": True}]}}
    hcm = {"@type": "type.googleapis.com/" + em.HCM, "statPrefix": "h",
           "routeConfig": {"name": "rc", "virtualHosts": [{"name": "vh", "domains": ["*"],
                                                           "routes": [route]}]},
           "httpFilters": [{"name": "envoy.filters.http.router", "typedConfig": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    listener = {"name": "l", "address": {"socketAddress": {"address": "127.0.0.1", "portValue": port}},
                "filterChains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                               "typedConfig": hcm}]}]}
    clusters = [_cluster(n, ups.get(n)) for n in ("c0", "ca", "cb", "empty")]
    clusters.append({"name": "orig", "type": "ORIGINAL_DST", "lbPolicy": "CLUSTER_PROVIDED",
                     "connectTimeout": "1s"})
    return {"admin": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": admin}}},
            "staticResources": {"listeners": [listener], "clusters": clusters}}


def _send(port: int, rid: str, headers: tuple[tuple[str, str], ...]) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", f"/h/{rid}", skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", "web:9000")
        conn.putheader("x-id", rid)
        for k, v in headers:  # duplicates kept, in order
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_envoy_shadows_where_the_model_says(
        envoy_bin: str, recorders: tuple[dict[str, int], list[tuple[str, dict[str, str]]]]) -> None:
    ups, got = recorders
    port, admin = free_ports(2)
    boot = bootstrap(port, admin, ups)
    plan = bootstrap_plan("mh", boot)
    routes = plan.listeners[0].virtual_hosts[0].routes
    assert routes[-1].verdict is Verdict.KERNEL, routes[-1].reason
    decisions = {f"r{i}": decide(plan, "l", Request("GET", f"/h/r{i}", "web:9000", h))
                 for i, h in enumerate(CASES)}
    # the header twice: the kernel hands it to Envoy (a guard's matcher on it is
    # undecidable there), which shadows to the first value's cluster
    assert {rid for rid, d in decisions.items() if d.kind != "forward"} == {"r5"}
    want = {rid: sorted(d.mirrors) for rid, d in decisions.items()} | {"r5": ["cb"]}
    envoy = EnvoyProc(envoy_bin, boot, [port])
    try:
        for i, h in enumerate(CASES):
            assert _send(port, f"r{i}", h) == 200
        n_shadows = sum(len(v) for v in want.values())
        deadline = time.monotonic() + 5
        while sum(1 for c, _ in got if c != "c0") < n_shadows and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # a shadow the model does not expect would show up now
        status, _, stats = http_request(admin, "GET", "/stats?filter=none_healthy", "a", {})
    finally:
        envoy.stop()
    primaries = [h["x-id"] for c, h in got if c == "c0" and h["host"] == "web:9000"]
    assert sorted(primaries) == sorted(want)
    seen: dict[str, list[str]] = {rid: [] for rid in want}
    for c, h in got:
        if c == "c0" and h["host"] == "web:9000":
            continue
        seen[h["x-id"]].append(c)
        assert h["x-forwarded-for"] and ("x-mc" in h or "x-mc2" in h), h  # the header stays
    assert {rid: sorted(v) for rid, v in seen.items()} == want, json.dumps(CASES)
    # the empty and ORIGINAL_DST clusters: Envoy picked no host (counted there only)
    lines = dict(ln.split(": ") for ln in stats.decode().splitlines() if ": " in ln)
    assert lines["cluster.empty.upstream_cx_none_healthy"] == "1"
    assert lines["cluster.orig.upstream_cx_none_healthy"] == "1"
