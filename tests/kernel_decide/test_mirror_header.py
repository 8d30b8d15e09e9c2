"""A `cluster_header` mirror route's guard entries in the kernel: l7fp_decide
hands Envoy exactly the requests whose header names a cluster the agent cannot
shadow to (a TLS cluster, a bootstrap's static cluster) or carries the header
twice, and forwards the rest as the reference model does (the agent then picks
the shadow's cluster from the copy: tests/split/test_mirror_header.py).

The kernel path against the real Envoy: tests/kernel_mirror (mesh, H_CASES)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from fastpath import bpf_structs as bs
from fastpath import envoy_model as em
from fastpath import reference
from fastpath.classify import Resources
from fastpath.split import plan_of
from fastpath.synth import synthesize
from kernel_decide.decide_prog import DecideProgram
from tests.kernel_decide.test_guards import raw
from tests.split.test_classify import listener

pytestmark = [pytest.mark.kernel]

VALUES = [(("x-mc", "ca"),), (("x-mc", "tls"),), (("x-mc", "xds-grpc"),), (("x-mc", "nosuch"),),
          (), (("x-mc", "ca"), ("x-mc", "tls")), (("x-mc", "orig"),), (("x-mc", "tlsx"),),
          (("x-mc", "tls"), ("x-mc", "ca"))]


def _cluster(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "load_assignment": {"cluster_name": name, "endpoints": [
        {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
            "address": "198.18.0.9", "port_value": port}}}}]}]}, **extra}


def test_mirror_header_guards_in_the_kernel() -> None:
    from support.env import require_kernel

    require_kernel()
    route = {"match": {"prefix": "/"}, "route": {
        "cluster": "c", "timeout": "0s", "request_mirror_policies": [{"cluster_header": "x-mc"}]}}
    lis = em.to_json(em.parse(em.LISTENER, listener([route])))
    clusters = [_cluster("c", 80), _cluster("ca", 81),
                _cluster("tls", 82, transport_socket={"name": "envoy.transport_sockets.tls"}),
                {"name": "orig", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"}]
    plan = plan_of("mh", Resources([lis], {}, [em.to_json(em.parse(em.CLUSTER, c))
                                                for c in clusters], {}))
    sp = synthesize(plan)
    prog = DecideProgram.get(sp.cflags)
    prog.load(sp)
    lid = sp.listener_ids["l"]
    got = {}
    for h in VALUES:
        req = reference.Request("GET", "/p", "web", h)
        ref = reference.decide(plan, "l", req, random.Random(1))
        d = prog.run(raw(req), listener=lid)
        got[h] = (ref.kind, bs.VERDICT_NAMES[d.verdict])
        where = (h, ref, bs.VERDICT_NAMES[d.verdict], bs.REASONS[d.reason])
        if ref.kind == "envoy":
            assert d.verdict == bs.PASS, where
        else:
            assert ref.kind == "forward" and d.verdict == bs.FORWARD, where
            assert d.cluster == sp.cluster_ids["c"], where
    envoy = {h for h, (kind, _) in got.items() if kind == "envoy"}
    assert envoy == {(("x-mc", "tls"),), (("x-mc", "xds-grpc"),), (("x-mc", "ca"), ("x-mc", "tls")),
                     (("x-mc", "tls"), ("x-mc", "ca"))}, got
