"""Endpoint weights: what Envoy 1.40 does with them, measured with the binary,
and the split's verdict on the same clusters.

Envoy weights ROUND_ROBIN and LEAST_REQUEST picks by `load_balancing_weight`
(1:9 gives 10 % / 90 %) and ignores the weights under RANDOM. The kernel picks
endpoints evenly (l7fp_decide: `rand2 % n`, or the round-robin counter), so a
ROUND_ROBIN or LEAST_REQUEST cluster with unequal weights is ENVOY; a RANDOM one,
and a RANDOM or ROUND_ROBIN cluster with equal weights, is KERNEL
(fastpath.classify.classify_cluster). LEAST_REQUEST with equal weights is
KERNEL: the kernel makes Envoy's power of two choices over its own requests in
flight (test_least_request_envoy.py, tests/kernel_datapath/test_least_request_kernel.py)."""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.classify import classify_cluster
from fastpath.plan import Verdict
from tests.split.harness import EnvoyProc, free_ports, prefix_router

pytestmark = [pytest.mark.envoy]

POLICIES = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM")
REQUESTS = 100


def cluster(lb: str, ports: list[int], weights: tuple[int, int]) -> dict[str, Any]:
    return {"name": f"{lb}-{weights[0]}-{weights[1]}", "type": "STATIC", "lb_policy": lb,
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": lb, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}},
                 "load_balancing_weight": w} for p, w in zip(ports, weights, strict=True)]}]}}


def classified(c: dict[str, Any]) -> Any:
    """The split's verdict on cluster ``c``, read as the split reads a file's cluster."""
    return classify_cluster(em.to_json(em.parse(em.CLUSTER, c)), {})


@pytest.fixture(scope="module")
def setup(envoy_bin: str) -> Iterator[tuple[int, list[int]]]:
    listen, *ups = free_ports(3)
    servers = []
    for port in ups:
        class Answer(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are two writes
            me = str(port).encode()

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-length", str(len(self.me)))
                self.end_headers()
                self.wfile.write(self.me)

            def log_message(self, *args: Any) -> None:
                pass

        srv = ThreadingHTTPServer(("127.0.0.1", port), Answer)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    clusters = [cluster(lb, ups, (1, 9)) for lb in POLICIES]
    boot = prefix_router(listen, clusters)
    envoy = EnvoyProc(envoy_bin, boot, [listen])
    try:
        yield listen, ups
    finally:
        envoy.stop()
        for srv in servers:
            srv.shutdown()
            srv.server_close()


def shares(listen: int, name: str, ups: list[int]) -> float:
    """Share of REQUESTS (on one connection: Envoy picks a host per request) it
    sent to the weight-9 endpoint."""
    seen: Counter[int] = Counter()
    conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=10)
    try:
        for _ in range(REQUESTS):
            conn.request("GET", f"/{name}")
            seen[int(conn.getresponse().read())] += 1
    finally:
        conn.close()
    assert set(seen) <= set(ups), seen
    return seen[ups[1]] / REQUESTS


@pytest.mark.parametrize("lb", POLICIES)
def test_envoy_weights_and_the_verdict(setup: tuple[int, list[int]], lb: str) -> None:
    listen, ups = setup
    heavy = shares(listen, f"{lb}-1-9", ups)
    got = classified(cluster(lb, ups, (1, 9)))
    if lb == "RANDOM":
        # weights ignored: ~50 % (binomial, 100 draws: 0.3..0.7 is 4 sd)
        assert 0.3 <= heavy <= 0.7, heavy
        assert got.verdict is Verdict.KERNEL, got.reason
    else:
        assert heavy >= 0.8, heavy  # weighted: 90 % seen (180 of 200 in a first run)
        assert got.verdict is Verdict.ENVOY
        assert f"endpoint weights under {lb}" in got.reason
    same = classified(cluster(lb, ups, (5, 5)))
    assert same.verdict is Verdict.KERNEL, same.reason
