"""Differential test on istiod-shaped config: the Istio importer's bookinfo sidecars.

The productpage sidecar (outbound: weighted subsets, header match, fault abort,
retries) and the details sidecar (inbound: AuthorizationPolicy DENY then ALLOW)
run in a real Envoy; the reference model over the split's plan must agree on
every request it handles in the kernel. Istio's default retry policy (503) is
what keeps these routes in Envoy today, so the split runs with that capability
assumed (`status_retries`): the backends never answer 5xx, so the retries
cannot change what Envoy does here.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.classify import Resources
from fastpath.classify_route import KernelCaps
from fastpath.plan import KernelPlan
from fastpath.reference import Request, State, decide
from fastpath.split import plan_of
from tests.istio.harness import Backend, make_static
from tests.split.harness import EnvoyProc, free_ports, http_request

pytestmark = [pytest.mark.envoy]
BOOKINFO = Path(__file__).resolve().parent.parent / "istio" / "bookinfo"
# Pods of bookinfo/mesh.yaml on loopback addresses of their own (not tests/istio's).
PODS = {"productpage-v1": "127.0.2.10", "reviews-v1": "127.0.2.11", "reviews-v2": "127.0.2.12",
        "reviews-v3": "127.0.2.13", "ratings-v1": "127.0.2.14", "details-v1": "127.0.2.15"}
HOSTS = ["reviews:9080", "reviews", "reviews.default.svc.cluster.local:9080", "ratings:9080",
         "ratings", "details:9080", "details", "198.19.0.13:9080", "nope:9080"]
PATHS = ["/", "/reviews/1", "/ratings/0", "/details/1", "/details/admin", "/details/admin2", "/x"]
HEADERS: list[dict[str, str]] = [{}, {"end-user": "jason"}, {"end-user": "bob"}]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    text = (BOOKINFO / "mesh.yaml").read_text()
    for i in range(10, 16):
        text = text.replace(f"198.18.0.{i},", f"127.0.2.{i},")
    path = tmp_path_factory.mktemp("mesh") / "mesh.yaml"
    path.write_text(text)
    backends = [Backend(name, ip, 9080) for name, ip in PODS.items()]
    try:
        yield path
    finally:
        for b in backends:
            b.close()


def _static(mesh_file: Path, pod: str, listener: str) -> tuple[dict[str, Any], int]:
    from xds_server import istio

    ip = PODS[pod]
    m = istio.load(BOOKINFO / "policies.yaml", mesh_file=mesh_file, inbound_address=ip)
    res = istio.generate(m, f"sidecar~{ip}~{pod}.default~default.svc.cluster.local")
    port, = free_ports(1)
    return make_static(res, {listener: port}), port


def _plan(boot: dict[str, Any]) -> KernelPlan:
    sr = boot["staticResources"]
    lis = [em.to_json(em.parse(em.LISTENER, x)) for x in sr["listeners"]]
    cls = [em.to_json(em.parse(em.CLUSTER, x)) for x in sr["clusters"]]
    return plan_of("t", Resources(lis, {}, cls, {}), caps=KernelCaps(status_retries=True))


def _allowed(plan: KernelPlan, route_name: str) -> set[str]:
    ips: set[str] = set()
    for lp in plan.listeners:
        for vh in lp.virtual_hosts:
            for r in vh.routes:
                if r.name == route_name and hasattr(r.action, "clusters"):
                    for wc in r.action.clusters:
                        c = plan.cluster(wc.name)
                        if c is not None and wc.weight > 0:
                            ips |= {e.address for e in c.endpoints}
    return ips


@pytest.mark.parametrize("pod,listener", [("productpage-v1", "0.0.0.0_9080"), ("details-v1", "virtualInbound")])
def test_bookinfo_sidecar(envoy_bin: str, mesh: Path, pod: str, listener: str) -> None:
    boot, port = _static(mesh, pod, listener)
    plan = _plan(boot)
    lp = plan.listeners[0]
    admin, = free_ports(1)
    envoy = EnvoyProc(envoy_bin, {**boot, "admin": {"address": {"socket_address": {
        "address": "127.0.0.1", "port_value": admin}}}}, [port])
    names = {ip: name for name, ip in PODS.items()}
    checked, bad = 0, []
    try:
        for host in HOSTS:
            for path in PATHS:
                for hdrs in HEADERS:
                    for method in ("GET", "POST"):
                        req = Request(method, path, host, tuple(hdrs.items()))
                        d = decide(plan, lp.name, req, random.Random(0), State())
                        if d.kind == "envoy":
                            continue
                        checked += 1
                        status, _, body = http_request(port, method, path, host, hdrs)
                        if d.kind == "reply":
                            ok = (status, body.decode()) == (d.status, d.body)
                        else:
                            who = body.decode().split(" ")[0]
                            allowed = {names.get(ip) for ip in _allowed(plan, d.route)}
                            ok = status == 200 and who in allowed
                        if not ok:
                            bad.append(f"{req} -> envoy {status} {body[:60]!r}, model {d}")
    finally:
        envoy.stop()
    assert not bad, "\n".join(bad[:5])
    print(f"{pod}: {checked} requests decided in the kernel and checked")
    assert checked >= 20, checked
