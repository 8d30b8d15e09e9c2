"""Envoy settings under which Envoy refuses requests the kernel would forward,
measured with the binary, and the split's verdict on the same listeners and
clusters (fastpath.classify._hcm_reasons, _cluster_options).

The kernel forwards a request head of up to 31 header lines and < 2048 bytes,
with any token in header names, over HTTP/1.1, and never cuts a stream by its
duration. Each setting below makes Envoy refuse a request of that kind (the
default listener serves it: 200), so a listener or cluster with the setting is
ENVOY, and without it KERNEL."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.plan import Verdict
from fastpath.split import split_snapshot
from tests.split.harness import EnvoyProc, free_ports

pytestmark = [pytest.mark.envoy]

HCM_T = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
SLOW_S = 1.0  # the upstream's answer to /slow comes after this

# name: (HCM settings, cluster settings, the request Envoy refuses, reason words)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], bytes, str]] = {
    "underscores": ({"common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"}},
                    {}, b"GET / HTTP/1.1\r\nHost: x\r\nx_a: 1\r\n\r\n", "rejects headers with underscores"),
    "headers_count": ({"common_http_protocol_options": {"max_headers_count": 5}}, {},
                      b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"h%d: 1\r\n" % i for i in range(8)) + b"\r\n",
                      "max_headers_count 5"),
    "headers_kb": ({"max_request_headers_kb": 1}, {},
                   b"GET / HTTP/1.1\r\nHost: x\r\nbig: " + b"a" * 1500 + b"\r\n\r\n", "max_request_headers_kb 1"),
    "codec_http2": ({"codec_type": "HTTP2"}, {}, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "codec_type HTTP2"),
    "stream_duration": ({"common_http_protocol_options": {"max_stream_duration": "0.3s"}}, {},
                        b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n", "http_connection_manager max_stream_duration"),
    "upstream_duration": ({}, {"typed_extension_protocol_options": {PROTOCOL_OPTIONS: {
        "@type": f"type.googleapis.com/{PROTOCOL_OPTIONS}",
        "common_http_protocol_options": {"max_stream_duration": "0.3s"},
        "explicit_http_config": {"http_protocol_options": {}}}}},
        b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n", "upstream max_stream_duration"),
}


def cluster(name: str, port: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": "1s", **extra,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


def listener(name: str, port: int, hcm: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "hcm", "typed_config": {
                "@type": HCM_T, "stat_prefix": name, **hcm, "http_filters": [ROUTER],
                "route_config": {"name": name, "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"}, "route": {"cluster": name, "timeout": "0s"}}]}]}}}]}]}


def verdicts(lis: dict[str, Any], clu: dict[str, Any]) -> list[tuple[Verdict, str]]:
    """The split's verdicts on the routes of `lis`, read as the split reads a file."""
    res = {em.LISTENER: [em.parse(em.LISTENER, lis)], em.CLUSTER: [em.parse(em.CLUSTER, clu)]}
    plan = split_snapshot("n", res).plan
    return [(r.verdict, r.reason) for r in plan.listeners[0].virtual_hosts[0].routes]


def status(port: int, request: bytes) -> int:
    """Envoy's status for one raw request; 0 when it closes without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return 0
            data += chunk
    return int(data.split(b" ", 2)[1])


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(SLOW_S)
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # Envoy resetting a /slow stream it cut: the late answer has nowhere to go


@pytest.fixture(scope="module")
def envoy(envoy_bin: str) -> Iterator[dict[str, int]]:
    """One Envoy: a listener (and its cluster) per case, and `default` without any setting."""
    up, *ports = free_ports(len(CASES) + 2)
    srv = QuietServer(("127.0.0.1", up), Upstream)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    names = ["default", *CASES]
    settings = {"default": ({}, {}), **{n: c[:2] for n, c in CASES.items()}}
    boot = {"static_resources": {
        "listeners": [listener(n, p, settings[n][0]) for n, p in zip(names, ports, strict=True)],
        "clusters": [cluster(n, up, settings[n][1]) for n in names]}}
    proc = EnvoyProc(envoy_bin, boot, ports)
    try:
        yield dict(zip(names, ports, strict=True))
    finally:
        proc.stop()
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_envoy_refuses_and_the_verdict_is_envoy(envoy: dict[str, int], case: str) -> None:
    hcm, clu, request, words = CASES[case]
    assert status(envoy["default"], request) == 200  # Envoy's defaults: served, as the kernel would
    got = status(envoy[case], request)
    assert got != 200, f"{case}: Envoy served {request[:60]!r}"
    (v, why), = verdicts(listener(case, 1, hcm), cluster(case, 1, clu))
    assert v is Verdict.ENVOY and words in why, (case, got, why)
    (v, why), = verdicts(listener("default", 1, {}), cluster("default", 1, {}))
    assert v is Verdict.KERNEL, why


def test_settings_within_the_kernels_limits_stay_kernel() -> None:
    for hcm in ({"common_http_protocol_options": {"max_headers_count": 32, "headers_with_underscores_action":
                                                  "ALLOW"}},
                {"max_request_headers_kb": 2, "codec_type": "HTTP1"}, {"codec_type": "AUTO"},
                {"common_http_protocol_options": {"max_stream_duration": "0s"}}):
        (v, why), = verdicts(listener("l", 1, hcm), cluster("l", 1, {}))
        assert v is Verdict.KERNEL, (hcm, why)
