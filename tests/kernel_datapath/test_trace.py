"""HCM tracing on the fast path (bpf_src/dp_xrid.h with -DDP_TRACE=1,
fastpath/tracing.py) vs the model and a real Envoy with the same listener
(random_sampling 30 %, no provider).

The kernel's ids: every one a UUID whose version digit is exactly the
model's decision from its own first 8 hex digits (9 when they % 10000 <
3000, else 4), both digits seen, every request served by the kernel (the
upstream's peer is a pool socket). A request with a trace header
(fastpath.tracing.TRACE_HEADERS) goes to Envoy, counted envoy/trace_header,
and its connection's next request comes back to the kernel; the head the
upstream gets then is Envoy's, the same as without the fast path. What
Envoy does with the digit and those headers: tests/split/test_tracing_envoy.py.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from k2_envoy import EnvoyMaker, ResourcesEnvoy, listener_and_cluster
from k2_plan import load_plan, run_client, split_plan
from test_delay import EchoUpstream
from test_hop import CLIENT

from fastpath.agent import Agent, _cflags
from fastpath.tracing import TRACE_HEADERS, traced_id_pattern, version_digit

pytestmark = [pytest.mark.kernel, pytest.mark.envoy]

N = 200  # plain requests: each id's digit checked against the model
SAMPLING = 3000  # random_sampling 30 %
TRACED = {"x-request-id": "00000001-1111-4111-8111-111111111111", "x-client-trace-id": "c1",
          "x-envoy-force-trace": "1", "x-envoy-decorator-operation": "op0"}


def resources(port: int, up_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    listener, cluster = listener_and_cluster(
        port, up_port, [{"name": "up", "match": {"prefix": "/"}, "route": {"cluster": "up"}}])
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
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
        heads = [(k, v) for k, v in r["headers"] if k != "x-envoy-expected-rq-timeout-ms"]
        assert [k for k, _ in heads] == ["host", "x-case", "x-forwarded-proto", "x-request-id"], heads
        rid = heads[-1][1]
        assert pattern.fullmatch(rid) and rid[14] == version_digit(rid, SAMPLING), rid
        digits[rid[14]] += 1
    assert digits["4"] and digits["9"], digits  # both decisions made (p ~ 1e-31 otherwise)
    for h in TRACED:
        assert seen[h]["via_envoy"] and not seen[f"next-{h}"]["via_envoy"], (seen[h], seen[f"next-{h}"])
        # Envoy's head, either way (the id's digit too: Envoy's mark, or its own sample)
        assert _norm(h, seen[h]) == _norm(h, envoy_seen[h]), (h, seen[h]["headers"], envoy_seen[h]["headers"])
    punted = sum(n for (_, outcome, why), n in kernel.items() if (outcome, why) == ("envoy", "trace_header"))
    assert punted == len(TRACE_HEADERS), kernel
