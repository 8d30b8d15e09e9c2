"""Request headers Envoy 1.40 strips, overwrites or acts on, seen by an upstream
behind a plain HTTP listener with default settings (what the kernel would
forward unchanged), and the kernel's decision for requests carrying them:
handed to Envoy (fastpath.reference._unparseable; the parser's
l7fp_parse_header in bpf_src/include/l7fp_http.h, tests/kernel_decide/test_parser.py).

Measured (2026-11-27): Envoy removes a client's x-forwarded-client-cert
(forward_client_cert_details SANITIZE, the default: on the kernel path the app
would see a forged one), x-envoy-internal, x-envoy-retry-on,
x-envoy-upstream-rq-timeout-ms, x-envoy-ip-tags, x-envoy-force-trace and
x-envoy-expected-rq-timeout-ms (the route has no timeout; with one, Envoy writes
its own value); it passes x-envoy-original-path and
x-envoy-external-address on. The kernel hands every x-envoy-* request and every
x-forwarded-client-cert request to Envoy."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.reference import Request, decide
from fastpath.split import split_snapshot
from tests.split.harness import EnvoyProc, echo_server, free_ports
from tests.split.test_hcm_limits_envoy import cluster, listener

pytestmark = [pytest.mark.envoy]

CLIENT = {  # header -> the value a client sends
    "x-forwarded-client-cert": "By=spiffe://cluster.local/ns/x/sa/admin;URI=spiffe://forged",
    "x-envoy-internal": "true",
    "x-envoy-retry-on": "5xx",
    "x-envoy-upstream-rq-timeout-ms": "100",
    "x-envoy-ip-tags": "trusted",
    "x-envoy-force-trace": "1",
    "x-envoy-expected-rq-timeout-ms": "7",
    "x-envoy-original-path": "/elsewhere",
    "x-envoy-external-address": "198.18.0.66",
}
# the route has no timeout: Envoy drops a client's expected-rq-timeout-ms (with
# one, it writes its own value)
REMOVED = {"x-forwarded-client-cert", "x-envoy-internal", "x-envoy-retry-on",
           "x-envoy-upstream-rq-timeout-ms", "x-envoy-ip-tags", "x-envoy-force-trace",
           "x-envoy-expected-rq-timeout-ms"}


@pytest.fixture(scope="module")
def seen(envoy_bin: str) -> Iterator[dict[str, str]]:
    """The headers the upstream got for one request carrying all of CLIENT."""
    port, = free_ports(1)
    with echo_server() as up:
        proc = EnvoyProc(envoy_bin, {"static_resources": {"listeners": [listener("l", port, {})],
                                                          "clusters": [cluster("l", up, {})]}}, [port])
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/", headers=CLIENT)
            r = conn.getresponse()
            assert r.status == 200
            yield json.loads(r.read())["headers"]
            conn.close()
        finally:
            proc.stop()


def kernel_decision(headers: dict[str, str]) -> Any:
    res = {em.LISTENER: [em.parse(em.LISTENER, listener("l", 8080, {}))],
           em.CLUSTER: [em.parse(em.CLUSTER, cluster("l", 9, {}))]}
    plan = split_snapshot("n", res).plan
    return decide(plan, "l", Request("GET", "/", "web", tuple(headers.items())))


def test_envoy_strips_and_overwrites(seen: dict[str, str]) -> None:
    assert REMOVED.isdisjoint(seen), seen
    passed = set(CLIENT) - REMOVED
    assert all(seen.get(h) == CLIENT[h] for h in passed), seen


@pytest.mark.parametrize("header", sorted(CLIENT))
def test_the_kernel_hands_them_to_envoy(header: str) -> None:
    assert kernel_decision({}).kind == "forward"  # the same request without it: the kernel's
    d = kernel_decision({header: CLIENT[header]})
    assert d.kind == "envoy" and header.split("-")[1] in d.reason, d
