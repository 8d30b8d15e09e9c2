"""Header names longer than 16 bytes in must-be-absent checks (pools engineer, Istio).

istiod turns on include_request_attempt_count on every virtual host, so every
Istio route sets `x-envoy-attempt-count: 1` (append=false: it overwrites what
the client sent). The kernel may insert it only when the request does not
carry one. Names over 16 bytes are keyed by (length, first 8, last 8 bytes),
so a different name can share the key: for an absence check that only sends
the request to Envoy, never a wrong answer."""

from __future__ import annotations

import pytest

from fastpath import bpf_structs as bs
from fastpath import plan as P
from fastpath.synth import synthesize
from kernel_decide.decide_prog import DecideProgram

pytestmark = [pytest.mark.kernel]


def _plan() -> P.KernelPlan:
    vh = P.VirtualHost("rv", ("rv",), (P.Route(
        "all", P.RouteMatch(P.PathKind.PREFIX, "/"), P.ClusterAction((P.WeightedCluster("c", 1),)),
        P.Verdict.KERNEL),), request_headers_to_add=(
            P.HeaderValue("x-envoy-attempt-count", "1", append=False),))
    lst = P.ListenerPlan("0.0.0.0_9080", "0.0.0.0", 9080, P.Direction.OUTBOUND, (vh,))
    return P.KernelPlan("n", "v", (lst,), (P.Cluster(
        "c", P.LbPolicy.ROUND_ROBIN, (P.Endpoint("198.18.0.9", 9080),)),))


REQS = [
    (b"GET / HTTP/1.1\r\nHost: rv\r\n\r\n", bs.FORWARD),
    (b"GET / HTTP/1.1\r\nHost: rv\r\nX-Envoy-Attempt-Count: 3\r\n\r\n", bs.PASS),
    # same length, first and last 8 bytes: shares the key, goes to Envoy (safe)
    (b"GET / HTTP/1.1\r\nHost: rv\r\nx-envoy-XXXXXpt-count: 1\r\n\r\n", bs.PASS),
    # same length, other first 8 bytes: another key, the kernel inserts its own
    (b"GET / HTTP/1.1\r\nHost: rv\r\nx-other-attempt-count: 1\r\n\r\n", bs.FORWARD),
    # any other x-envoy-* header: Envoy's (tests/split/test_stripped_headers_envoy.py)
    (b"GET / HTTP/1.1\r\nHost: rv\r\nx-envoy-attempt-counts: 1\r\n\r\n", bs.PASS),
]


def test_istio_attempt_count_is_set_by_the_kernel_only_when_absent() -> None:
    from support.env import require_kernel

    require_kernel()
    sp = synthesize(_plan())
    assert not [n for n in sp.notes if "not matched" in n], sp.notes  # not a punt any more
    prog = DecideProgram.get(sp.cflags)
    prog.load(sp)
    lid = sp.listener_ids["0.0.0.0_9080"]
    for req, verdict in REQS:
        d = prog.run(req, listener=lid)
        assert d.verdict == verdict, (req, d.verdict, d.reason)
        if verdict == bs.FORWARD:
            assert d.hdr_add, req
