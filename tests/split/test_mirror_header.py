"""Mirroring to a cluster named by a request header (`cluster_header`), no kernel.

What Envoy 1.40 does (tests/kernel_mirror/test_mirror_header_envoy.py shows it
with the real binary; the kernel/Envoy comparison is tests/kernel_mirror): the
first value of the header, without surrounding whitespace, names the cluster;
no header, an empty value or a name that is no cluster sends no shadow; a
cluster without a host to pick (no endpoints, ORIGINAL_DST) neither.
"""

from __future__ import annotations

import ctypes as ct
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.agent_mirror import HEAD_SIZE, Mirrorer, MirrorEv, RoutePolicies, header_targets
from fastpath.mirror import BOOTSTRAP_CLUSTERS, header_cluster, mirror_policies
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
from tests.split.test_classify import CLUSTER, listener

A = Cluster("ca", LbPolicy.ROUND_ROBIN, (Endpoint("198.18.0.10", 80),))
B = Cluster("cb", LbPolicy.ROUND_ROBIN, (Endpoint("198.18.0.11", 81),))
EMPTY = Cluster("empty", LbPolicy.ROUND_ROBIN, ())
ORIG = Cluster("orig", LbPolicy.ROUND_ROBIN, (), verdict=Verdict.ENVOY, reason="original destination",
               original_dst=True)
TLS = Cluster("tls", LbPolicy.ROUND_ROBIN, A.endpoints, tls=True, verdict=Verdict.ENVOY,
              reason="upstream TLS")


@pytest.mark.parametrize("head,want", [
    (b"GET / HTTP/1.1\r\nhost: h\r\nx-mc: ca\r\n\r\n", "ca"),
    (b"GET / HTTP/1.1\r\nX-MC:   ca  \r\nhost: h\r\n\r\nbody", "ca"),  # OWS trimmed
    (b"GET / HTTP/1.1\r\nx-mc: cb\r\nx-mc: ca\r\n\r\n", "cb"),  # the first value
    (b"GET / HTTP/1.1\r\nx-mc: ca,cb\r\n\r\n", "ca,cb"),  # one name (no such cluster)
    (b"GET / HTTP/1.1\r\nx-mc:\r\nx-mc: ca\r\n\r\n", None),  # empty first value
    (b"GET / HTTP/1.1\r\nhost: h\r\n\r\n", None),
    (b"GET /x-mc: ca HTTP/1.1\r\nhost: h\r\n\r\nx-mc: ca", None),  # request line, body
])
def test_header_cluster_is_envoys_first_value(head: bytes, want: str | None) -> None:
    assert header_cluster(head, "x-mc") == want


def _split(routes: list[dict[str, Any]], *clusters: dict[str, Any]) -> tuple[Route, ...]:
    res = {em.LISTENER: [em.parse(em.LISTENER, listener(routes))],
           em.CLUSTER: [em.parse(em.CLUSTER, c) for c in (CLUSTER, *clusters)]}
    return split_snapshot("n", res).plan.listeners[0].virtual_hosts[0].routes


def _cluster(name: str, **extra: Any) -> dict[str, Any]:
    return {**CLUSTER, "name": name, "load_assignment": {**CLUSTER["load_assignment"],
                                                       "cluster_name": name}, **extra}


MIRROR_ROUTE = {"match": {"prefix": "/"}, "route": {
    "cluster": "c", "timeout": "0s",
    "request_mirror_policies": [{"cluster_header": "X-MC",
                                 "runtime_fraction": {"default_value": {"numerator": 50}}}]}}


def test_route_is_kernel_with_guards_for_what_the_agent_cannot_send() -> None:
    """A TLS cluster (Envoy would shadow over TLS) and the bootstraps' static
    clusters get a guard punt entry (exact header value); a plain cluster and
    an ORIGINAL_DST one (Envoy finds no host for a shadow) do not."""
    orig = {"name": "orig", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"}
    tls = _cluster("tls", transport_socket={"name": "envoy.transport_sockets.tls"})
    routes = _split([MIRROR_ROUTE], _cluster("ca"), orig, tls)
    *guards, route = routes
    assert route.verdict is Verdict.KERNEL, route.reason
    assert isinstance(route.action, ClusterAction)
    assert route.action.mirrors == (MirrorPolicy("", 500_000, cluster_header="x-mc"),)
    named = [(g.match.headers[-1].name, g.match.headers[-1].match.value) for g in guards
             if g.match.headers[-1].match is not None]
    assert named == [("x-mc", n) for n in ("tls", *BOOTSTRAP_CLUSTERS)]
    assert all(g.guard and g.verdict is Verdict.ENVOY for g in guards)


def test_route_changing_the_header_or_too_many_bad_clusters_stay_envoy() -> None:
    adds = {**MIRROR_ROUTE, "request_headers_to_add": [{"header": {"key": "x-mc", "value": "ca"}}]}
    (r,) = _split([adds], _cluster("ca"))
    assert r.verdict is Verdict.ENVOY and "x-mc changed by the route" in r.reason
    tls = [_cluster(f"t{i}", transport_socket={"name": "tls"}) for i in range(9)]
    (r,) = _split([MIRROR_ROUTE], *tls)
    assert r.verdict is Verdict.ENVOY and "may name 9 clusters" in r.reason


def _plan(*mirrors: MirrorPolicy) -> KernelPlan:
    route = Route("r", RouteMatch(PathKind.PREFIX, "/"),
                  ClusterAction((WeightedCluster("ca", 1),), mirrors=mirrors), Verdict.KERNEL)
    return listener_plan((route,), (A, B, EMPTY, ORIG, TLS))


@pytest.mark.parametrize("headers,want", [
    ((("x-mc", "ca"),), ("ca",)), ((("x-mc", "cb"),), ("cb",)), ((("x-mc", "nosuch"),), ()),
    ((), ()), ((("x-mc", ""),), ()), ((("x-mc", "cb"), ("x-mc", "ca")), ("cb",)),
    ((("x-mc", "empty"),), ()), ((("x-mc", "orig"),), ()), ((("x-mc", "CA"),), ()),
])
def test_model_names_the_header_cluster(headers: tuple[tuple[str, str], ...],
                                        want: tuple[str, ...]) -> None:
    plan = _plan(MirrorPolicy("", cluster_header="x-mc"))
    d = decide(plan, "l", Request("GET", "/", "h", headers))
    assert d.kind == "forward" and d.mirrors == want


def test_model_combines_policies() -> None:
    """Each policy on its own (Envoy 1.40: two header policies and a named one
    send three shadows)."""
    plan = _plan(MirrorPolicy("", cluster_header="x-mc"), MirrorPolicy("", cluster_header="x-mc2"),
                 MirrorPolicy("ca"))
    d = decide(plan, "l", Request("GET", "/", "h", (("x-mc", "cb"), ("x-mc2", "ca"))))
    assert d.mirrors == ("cb", "ca", "ca")


def test_agent_sends_to_the_cluster_the_copy_names() -> None:
    plan = _plan()
    pols = (MirrorPolicy("", cluster_header="x-mc"), MirrorPolicy("ca", host_suffix=False))
    mi = Mirrorer(dp=None, netns=None, ip="198.18.0.2")
    mi.routes[(1, 3)] = RoutePolicies(pols, ((), (("198.18.0.10", 80),)), 15.0, header_targets(plan))
    assert set(header_targets(plan)) == {"ca", "cb", "empty", "orig"}  # not the TLS cluster
    for value in (b"cb", b"ca", b"nosuch", None, b"empty", b"orig"):
        req = b"GET / HTTP/1.1\r\nhost: web\r\n" + (b"x-mc: " + value + b"\r\n" if value else b"") \
            + b"\r\n"
        ev = MirrorEv(kind=6, route=3, gen=1, mask=0b1, len=len(req))
        ct.memmove(ev.req, req, len(req))
        rec = ct.create_string_buffer(bytes(ev)[:HEAD_SIZE + len(req)])
        mi.on_event(ct.addressof(rec), HEAD_SIZE + len(req))
    got = [mi.q.get_nowait() for _ in range(mi.q.qsize())]
    assert [(s.address, s.port, s.host_suffix) for s in got] == [("198.18.0.11", 81, True),
                                                                ("198.18.0.10", 80, True)]
    assert mi.stats == {"queued": 2, "unknown_cluster": 1, "no_cluster_header": 1,
                        "no_endpoint": 2}


def test_policy_parse() -> None:
    got, why = mirror_policies([{"clusterHeader": "X-Mc", "disableShadowHostSuffixAppend": True},
                                {"cluster": "ca"}], {"ca": A})
    assert got == (MirrorPolicy("", host_suffix=False, cluster_header="x-mc"), MirrorPolicy("ca"))
    assert not why
