"""LEAST_REQUEST under concurrency: what Envoy 1.40 does, measured with the
binary, and the split's verdict on the same cluster.

Two endpoints on loopback, one answering after SLOW_S, one at once; CLIENTS
keep-alive clients send REQUESTS each through Envoy, at the same time. Envoy's
LEAST_REQUEST with equal weights is power of two choices over its own active
requests per host, so the slow host (many requests in flight) is picked only
when both draws land on it: about a quarter of the requests, where RANDOM and
ROUND_ROBIN send it half. The kernel makes the same pick over its own
requests in flight (l7fp_decide.h l7fp_pick_lr; measured on the kernel path:
tests/kernel_datapath/test_least_request_kernel.py), so such a cluster is
KERNEL, with two endpoints as with one."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.classify import classify_cluster
from fastpath.plan import Verdict
from tests.split.harness import EnvoyProc, free_ports, prefix_router

# Concurrent clients and a wall-clock deadline: `alone` keeps a busy neighbour
# from stretching the fast endpoint's answers towards the slow one's.
pytestmark = [pytest.mark.envoy, pytest.mark.alone]

POLICIES = ("LEAST_REQUEST", "RANDOM", "ROUND_ROBIN")
SLOW_S = 0.2
CLIENTS = 8
REQUESTS = 25  # per client
DEADLINE_S = 20.0  # all the requests; about 2.5 s seen


def cluster(lb: str, ports: list[int]) -> dict[str, Any]:
    return {"name": lb, "type": "STATIC", "lb_policy": lb, "connect_timeout": "5s",
            "load_assignment": {"cluster_name": lb, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                for p in ports]}]}}


def classified(c: dict[str, Any]) -> Any:
    """The split's verdict on cluster ``c``, read as the split reads a file's cluster."""
    return classify_cluster(em.to_json(em.parse(em.CLUSTER, c)), {})


def answer(port: int, delay: float) -> ThreadingHTTPServer:
    class Answer(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes
        me = str(port).encode()

        def do_GET(self) -> None:
            if delay:
                time.sleep(delay)
            self.send_response(200)
            self.send_header("content-length", str(len(self.me)))
            self.end_headers()
            self.wfile.write(self.me)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        # Envoy opens a connection per request in flight (up to every client
        # at once): the default backlog of 5 drops SYNs, a 1 s retransmit.
        request_queue_size = 64
        daemon_threads = True

    srv = Server(("127.0.0.1", port), Answer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def setup(envoy_bin: str) -> Iterator[tuple[int, int, int]]:
    """(Envoy's port, slow endpoint's port, fast endpoint's port)."""
    listen, slow, fast = free_ports(3)
    servers = [answer(slow, SLOW_S), answer(fast, 0.0)]
    clusters = [cluster(lb, [slow, fast]) for lb in POLICIES]
    boot = prefix_router(listen, clusters)
    envoy = EnvoyProc(envoy_bin, boot, [listen])
    try:
        yield listen, slow, fast
    finally:
        envoy.stop()
        for srv in servers:
            srv.shutdown()
            srv.server_close()


def slow_shares(listen: int, slow: int, fast: int) -> dict[str, tuple[float, int]]:
    """Policy -> (share of its requests the slow endpoint answered, requests
    answered): CLIENTS keep-alive clients per policy, REQUESTS each, every
    policy's clients at the same time (each cluster has its own hosts, so its
    own active-request counts), within DEADLINE_S."""
    seen: dict[str, Counter[int]] = {lb: Counter() for lb in POLICIES}
    errors: list[BaseException] = []
    lock = threading.Lock()
    deadline = time.monotonic() + DEADLINE_S

    def client(lb: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=DEADLINE_S)
        try:
            for _ in range(REQUESTS):
                if time.monotonic() > deadline:
                    break
                conn.request("GET", f"/{lb}")
                port = int(conn.getresponse().read())
                with lock:
                    seen[lb][port] += 1
        except BaseException as e:  # reported by the test, not lost in the thread
            errors.append(e)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(lb,)) for lb in POLICIES for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S + 5)
    assert not errors, errors
    out = {}
    for lb, got in seen.items():
        assert set(got) <= {slow, fast}, (lb, got)
        total = sum(got.values())
        out[lb] = (got[slow] / max(total, 1), total)
    return out


def test_least_request_avoids_the_slow_endpoint(setup: tuple[int, int, int]) -> None:
    listen, slow, fast = setup
    shares = slow_shares(listen, slow, fast)
    print("slow endpoint's share (requests):", shares)
    for lb, (_, total) in shares.items():
        # most requests answered: the shares below are of a real sample
        assert total >= CLIENTS * REQUESTS // 2, (lb, shares)
    lr, rnd, rr = (shares[lb][0] for lb in POLICIES)
    # RANDOM and ROUND_ROBIN: half (binomial, 200 requests: 0.35..0.65 is over 4 sd)
    assert 0.35 <= rnd <= 0.65, shares
    assert 0.35 <= rr <= 0.65, shares
    # LEAST_REQUEST: about a quarter (both draws on the slow host); clearly
    # fewer than RANDOM, with room for a loaded machine
    assert lr <= rnd - 0.08 and lr <= 0.4, shares


def test_verdicts_on_the_same_clusters(setup: tuple[int, int, int]) -> None:
    _, slow, fast = setup
    for lb in POLICIES:
        two = classified(cluster(lb, [slow, fast]))
        assert two.verdict is Verdict.KERNEL, two.reason
        one = classified(cluster(lb, [fast]))
        assert one.verdict is Verdict.KERNEL, one.reason
