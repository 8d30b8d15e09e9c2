"""Request mirroring: classification, reference model, shadow bytes (no kernel).

The kernel/Envoy comparison is tests/kernel_mirror (real Envoy, real data path).
"""

from __future__ import annotations

import ctypes as ct
import random
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.agent_mirror import HEAD_SIZE, MIRROR_MAX, MirrorEv, needs_mirror, parse_record
from fastpath.mirror import mirror_policies, shadow_host, shadow_request
from fastpath.plan import (
    Cluster,
    ClusterAction,
    Endpoint,
    KernelPlan,
    LbPolicy,
    MirrorPolicy,
    PathKind,
    Route,
    RouteMatch,
    Verdict,
    WeightedCluster,
)
from fastpath.reference import Request, decide
from fastpath.split import split_snapshot
from tests.split.harness import listener_plan
from tests.split.test_classify import CLUSTER, fwd, listener

C = Cluster("c", LbPolicy.ROUND_ROBIN, (Endpoint("198.18.0.9", 80),))
M = Cluster("m", LbPolicy.ROUND_ROBIN, (Endpoint("198.18.0.10", 80),))


@pytest.mark.parametrize("host,shadow", [
    ("web:9000", "web-shadow:9000"), ("web", "web-shadow"), ("a.b.c", "a.b.c-shadow"),
    ("[::1]:80", "[::1]-shadow:80"), ("[::1]", "[::1]-shadow"), ("a:xy", "a:xy-shadow"),
])
def test_shadow_host_is_envoys(host: str, shadow: str) -> None:
    assert shadow_host(host) == shadow


def test_shadow_request_rewrites_host_and_appends_xff() -> None:
    req = b"POST /p?q HTTP/1.1\r\nHost: web:9000\r\nx-a: 1\r\ncontent-length: 3\r\n\r\nabc"
    out = shadow_request(req, True, "198.18.0.2")
    assert out == (b"POST /p?q HTTP/1.1\r\nHost: web-shadow:9000\r\nx-a: 1\r\ncontent-length: 3"
                   b"\r\nx-forwarded-for: 198.18.0.2\r\n\r\nabc")
    req2 = b"GET / HTTP/1.1\r\nx-forwarded-for: 1.2.3.4\r\nhost: h\r\n\r\n"
    assert shadow_request(req2, False, "198.18.0.2") == \
        b"GET / HTTP/1.1\r\nx-forwarded-for: 1.2.3.4,198.18.0.2\r\nhost: h\r\n\r\n"
    assert shadow_request(req2, False) == req2
    with pytest.raises(ValueError, match="Host"):
        shadow_request(b"GET / HTTP/1.1\r\nx: y\r\n\r\n")
    with pytest.raises(ValueError, match="complete head"):
        shadow_request(b"GET / HTTP/1.1\r\nhost: y\r\n")


@pytest.mark.parametrize("frac,per_million", [
    (None, 1_000_000), ({"defaultValue": {"numerator": 50}}, 500_000),
    ({"defaultValue": {"numerator": 25, "denominator": "TEN_THOUSAND"}}, 2_500),
    ({"defaultValue": {"numerator": 7, "denominator": "MILLION"}, "runtimeKey": "k"}, 7),
    ({"runtimeKey": "k"}, 0),  # a default of 0 %: Envoy never mirrors either
])
def test_runtime_fraction(frac: dict[str, Any] | None, per_million: int) -> None:
    item: dict[str, Any] = {"cluster": "m"}
    if frac is not None:
        item["runtimeFraction"] = frac
    got, why = mirror_policies([item], {"m": M})
    assert got == (MirrorPolicy("m", per_million),) and not why


def test_policies_that_stay_envoys() -> None:
    got, why = mirror_policies([{"clusterHeader": "X-M"}], {"m": M})  # tests/split/test_mirror_header.py
    assert got == (MirrorPolicy("", cluster_header="x-m"),) and not why
    _, why = mirror_policies([{}], {"m": M})
    assert why == ["request_mirror_policies[0] without a cluster name"]
    _, why = mirror_policies([{"cluster": "m", "requestHeadersMutations": []}], {"m": M})
    assert why == ["request_mirror_policies[0] requestHeadersMutations"]
    _, why = mirror_policies([{"cluster": "m"}] * 5, {"m": M})
    assert why == ["more than 4 request_mirror_policies"]
    tls = Cluster("t", LbPolicy.ROUND_ROBIN, M.endpoints, tls=True, verdict=Verdict.ENVOY,
                  reason="upstream TLS")
    _, why = mirror_policies([{"cluster": "t"}], {"t": tls})
    assert why == ["mirror cluster 't': upstream TLS"]
    got, why = mirror_policies([{"cluster": "m", "disableShadowHostSuffixAppend": True,
                                 "traceSampled": False}], {"m": M})
    assert got == (MirrorPolicy("m", 1_000_000, host_suffix=False),) and not why


def test_split_puts_the_mirror_into_the_plan() -> None:
    mirror = {**CLUSTER, "name": "m", "load_assignment": {**CLUSTER["load_assignment"],
                                                        "cluster_name": "m"}}
    route = fwd(timeout="0s", request_mirror_policies=[
        {"cluster": "m", "runtime_fraction": {"default_value": {"numerator": 10}}}])
    res = {em.LISTENER: [em.parse(em.LISTENER, listener([route]))],
           em.CLUSTER: [em.parse(em.CLUSTER, CLUSTER), em.parse(em.CLUSTER, mirror)]}
    plan = split_snapshot("n", res).plan
    r = plan.listeners[0].virtual_hosts[0].routes[0]
    assert r.verdict is Verdict.KERNEL, r.reason
    assert isinstance(r.action, ClusterAction)
    assert r.action.mirrors == (MirrorPolicy("m", 100_000),)
    assert needs_mirror(plan)


def _plan(*mirrors: MirrorPolicy) -> KernelPlan:
    route = Route("r", RouteMatch(PathKind.PREFIX, "/"),
                  ClusterAction((WeightedCluster("c", 1),), mirrors=mirrors), Verdict.KERNEL)
    return listener_plan((route,), (C, M))


def test_model_says_where_the_shadows_go() -> None:
    req = Request("GET", "/x", "a")
    d = decide(_plan(MirrorPolicy("m"), MirrorPolicy("c", 0), MirrorPolicy("m", host_suffix=False)),
               "l", req)
    assert d.kind == "forward" and d.cluster == "c" and d.mirrors == ("m", "m")
    assert decide(_plan(), "l", req).mirrors == ()
    assert not needs_mirror(_plan())
    rng = random.Random(7)
    n = sum(bool(decide(_plan(MirrorPolicy("m", 250_000)), "l", req, rng).mirrors)
            for _ in range(4000))
    assert 850 < n < 1150, n  # 25 %


def test_record_cuts_the_inbound_insert() -> None:
    req = b"GET / HTTP/1.1\r\nhost: h\r\nx-out: 1\r\nx-in: 2\r\n\r\n"
    ev = MirrorEv(kind=6, route=3, gen=1, mask=5, len=len(req))
    ct.memmove(ev.req, req, len(req))
    ev.cut_at = req.index(b"x-in")
    ev.cut_len = len(b"x-in: 2\r\n")
    raw = bytes(ev)[:HEAD_SIZE + len(req)]
    assert parse_record(raw) == (1, 3, 5, b"GET / HTTP/1.1\r\nhost: h\r\nx-out: 1\r\n\r\n")
    ev.cut_len = 0
    assert parse_record(bytes(ev)[:HEAD_SIZE + len(req)])[3] == req
    assert ct.sizeof(MirrorEv) == 32 + MIRROR_MAX == HEAD_SIZE + MIRROR_MAX
    with pytest.raises(ValueError):
        parse_record(raw[:20])


IMPORT = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: default}
spec:
  hosts: [rec]
  http:
  - route: [{destination: {host: rec, subset: v1}}]
    mirror: {host: rec, subset: v2}
    mirrorPercentage: {value: 12.5}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: g, namespace: default}
spec:
  parentRefs: [{kind: Service, name: foo, port: 8080}]
  rules:
  - backendRefs: [{name: foo-v1, port: 8080}]
    filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: foo-v2, port: 8080}
        fraction: {numerator: 1, denominator: 4}
"""


def test_importers_give_envoys_mirror_policy_and_its_cluster(tmp_path: Any) -> None:
    """Istio `mirror` + `mirrorPercentage` and Gateway API `RequestMirror` with a
    `fraction` -> request_mirror_policies with runtime_fraction; the mirror
    destination gets a cluster (a subset stand-in too) like a route's."""
    import json

    from xds_server.istio.reader import read_file

    f = tmp_path / "m.yaml"
    f.write_text(IMPORT)
    res = read_file(f)
    text = json.dumps(res)
    clusters = {c["name"] for t, items in res.items() if t.endswith("Cluster") for c in items}
    want = {"outbound|80|v2|rec.default.svc.cluster.local": 125_000,
            "outbound|8080||foo-v2.default.svc.cluster.local": 250_000}
    for name, per in want.items():
        pol = {"cluster": name, "runtimeFraction": {"defaultValue": {"numerator": per,
                                                                    "denominator": "MILLION"}}}
        assert json.dumps(pol) in text
        assert name in clusters


def test_a_short_record_becomes_one_shadow_per_sampled_policy() -> None:
    """dp_mirror_rb records are as long as the request: the header + len bytes."""
    from fastpath.agent_mirror import Mirrorer, RoutePolicies

    req = b"POST /p HTTP/1.1\r\nhost: web:9000\r\ncontent-length: 2\r\n\r\nhi"
    ev = MirrorEv(kind=6, route=3, gen=1, mask=0b101, len=len(req))
    ct.memmove(ev.req, req, len(req))
    rec = ct.create_string_buffer(bytes(ev)[:HEAD_SIZE + len(req)])
    mi = Mirrorer(dp=None, netns=None, ip="198.18.0.2")
    pols = (MirrorPolicy("m"), MirrorPolicy("m"), MirrorPolicy("c", host_suffix=False))
    mi.routes[(1, 3)] = RoutePolicies(pols, ((("198.18.0.10", 80),), (("198.18.0.10", 80),),
                                             (("198.18.0.9", 81),)), 15.0)
    mi.on_event(ct.addressof(rec), HEAD_SIZE + len(req))
    got = [mi.q.get_nowait() for _ in range(mi.q.qsize())]
    assert [(s.address, s.port, s.host_suffix) for s in got] == [("198.18.0.10", 80, True),
                                                                ("198.18.0.9", 81, False)]
    assert got[0].req == req
    mi.on_event(ct.addressof(rec), 8)  # shorter than a header: counted, dropped
    ev.gen = 0
    rec2 = ct.create_string_buffer(bytes(ev)[:HEAD_SIZE + len(req)])
    mi.on_event(ct.addressof(rec2), HEAD_SIZE + len(req))  # generation without a policy
    assert mi.stats == {"queued": 2, "bad_copy": 1, "no_policy": 1}
