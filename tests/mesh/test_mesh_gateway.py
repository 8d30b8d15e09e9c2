"""An Istio ingress gateway in the local mesh (mesh file `gateways:`), served by
`l7fp serve --policies`: real namespaces, real Envoys, real iptables interception
on the destinations, requests from the host (the outside) to GATEWAY_IP:8080.

The mesh (gateway_mesh/): web (web-v1, web-v2: DestinationRule subsets), api
(an AuthorizationPolicy denies /admin*), gateway `ingress` selected by the
Istio Gateway on 8080 for web.example.com and api.example.com, gateway
`spare` selected by none. The mesh runs with `--fastpath on`: the gateway's
Envoy routes to pod addresses itself, the destinations' inbound sidecars
still apply their policy.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshtest_util import leftovers

from mesh import configdir, teardown
from mesh.ready import wait_ready
from mesh.runner import Mesh, MeshError, envoy_stats, find_pod, repo_pythonpath

pytestmark = [pytest.mark.kernel, pytest.mark.mesh, pytest.mark.envoy, pytest.mark.slow]
HERE = Path(__file__).resolve().parent
# in a pod: N GETs of http://HOST:PORT/m, one line `status:x-l7fp-pod` each
POD_GETS = """import http.client, sys
for _ in range(int(sys.argv[3])):
    c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
    c.request("GET", "/m")
    r = c.getresponse()
    print(f"{r.status}:{r.getheader('x-l7fp-pod')}")
    c.close()
"""


@pytest.fixture(scope="module")
def gw_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    from support.env import require_kernel
    require_kernel()
    src = tmp_path_factory.mktemp("gw") / "gateway_mesh"
    shutil.copytree(HERE / "gateway_mesh", src)  # the policy edit must not touch the repo
    m = Mesh(src / "mesh.yaml", f"gw{os.getpid() % 100000}", fastpath="on", timeout=120)
    try:
        m.up()
        yield m
    finally:
        m.down()
    assert leftovers(m.name) == []


def get(ip: str, host: str, path: str = "/", **headers: str) -> tuple[int, str, str]:
    """One GET to the gateway from the host: (status, x-l7fp-pod, body)."""
    conn = http.client.HTTPConnection(ip, 8080, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host, **headers})
        r = conn.getresponse()
        return r.status, r.getheader("x-l7fp-pod") or "", r.read().decode(errors="replace")
    finally:
        conn.close()


def gateway_ip(m: Mesh) -> str:
    return str(m.pod("ingress")["ip"])


def test_gateway_pod_state_and_no_capture(gw_mesh: Mesh) -> None:
    st = gw_mesh.state()
    gws = {g["service"]: g for g in st["gateways"]}
    ing, spare = gws["ingress"], gws["spare"]
    assert ing["node_id"] == (f"router~{ing['ip']}~ingress-0.shop~shop.svc.cluster.local")
    assert (ing["ready"], ing["ports"], ing["labels"]) == (True, [8080], {"istio": "ingressgateway"})
    assert not spare["ready"] and "no Gateway selects" in spare["not_ready"], spare
    assert all(g["name"] not in {p["name"] for p in st["pods"]} for g in st["gateways"])
    nat = subprocess.run(["ip", "netns", "exec", ing["netns"], "iptables-save", "-t", "nat"],
                         capture_output=True, text=True, check=True).stdout
    assert "ISTIO" not in nat  # the edge: nothing intercepted in the gateway's netns
    api_nat = subprocess.run(["ip", "netns", "exec", find_pod(st, "api")["netns"], "iptables-save",
                              "-t", "nat"], capture_output=True, text=True, check=True).stdout
    assert "ISTIO_IN_REDIRECT" in api_nat  # the destinations' sidecars do capture
    status = subprocess.run([sys.executable, "-m", "xds_server", "mesh", "status", "--name",
                             gw_mesh.name], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": repo_pythonpath()})
    lines = [x for x in status.stdout.splitlines() if x.startswith("gateway ")]
    assert len(lines) == 2 and lines[0].endswith(": ready") and "NOT ready" in lines[1], status


def test_gateway_routes_by_host_and_header(gw_mesh: Mesh) -> None:
    ip = gateway_ip(gw_mesh)
    assert {get(ip, "web.example.com", "/a")[:2] for _ in range(6)} == {(200, "web-v1-0")}
    assert {get(ip, "web.example.com", "/a", **{"x-version": "v2"})[:2]
            for _ in range(6)} == {(200, "web-v2-0")}
    assert get(ip, "api.example.com", "/items")[:2] == (200, "api-0")
    status, pod, _ = get(ip, "shop.example.com", "/a")  # a host the Gateway does not list
    assert (status, pod) == (404, "")


def test_mesh_only_virtualservice_is_not_the_gateways(gw_mesh: Mesh) -> None:
    """web-mesh (no `gateways:`) sends the sidecars' web requests to v2; the
    gateway's default (web-edge) stays v1 (test above)."""
    out = gw_mesh.exec("api", [sys.executable, "-c", POD_GETS, "web", "9000", "4"],
                       capture_output=True, text=True, timeout=60).stdout
    assert out.split() == ["200:web-v2-0"] * 4, out


def test_authorization_policy_enforced_by_the_destination_sidecar(gw_mesh: Mesh) -> None:
    """With api's kernel node loaded (--fastpath on): the gateway's requests reach
    api's sidecar, whose RBAC denies /admin*; the agent loads no node for a gateway."""
    ip, st = gateway_ip(gw_mesh), gw_mesh.state()
    dbg = wait_ready(st["admin"], client="api", timeout=120)
    assert not [n["pod"] for n in dbg["nodes"] if n["pod"].startswith(("ingress", "spare"))]
    denied = "rbac.denied"
    before = sum(v for k, v in envoy_stats(st, "api", "rbac").items() if k.endswith(denied))
    assert get(ip, "api.example.com", "/admin/x")[::2] == (403, "RBAC: access denied")
    assert get(ip, "api.example.com", "/ok")[:2] == (200, "api-0")
    after = sum(v for k, v in envoy_stats(st, "api", "rbac").items() if k.endswith(denied))
    assert after == before + 1  # the destination's sidecar said no, not the gateway
    assert not [k for k in envoy_stats(st, "ingress", "rbac") if k.endswith(denied)]


def test_policy_edit_reaches_the_gateway(gw_mesh: Mesh) -> None:
    ip = gateway_ip(gw_mesh)
    policy = Path(gw_mesh.spec.path).parent / "istio" / "gateway.yaml"
    text = policy.read_text()
    default = "  - route:\n    - destination: {host: web, subset: v1}"
    assert text.count(default) == 1
    configdir.atomic_write(policy, text.replace(default, default.replace("v1", "v2")))
    deadline, seen = time.monotonic() + 30, []
    while time.monotonic() < deadline and len(seen) < 300:
        seen.append(get(ip, "web.example.com", "/edit")[1])
        if seen[-1] == "web-v2-0":
            break
        time.sleep(0.1)
    assert seen[-1] == "web-v2-0", f"{len(seen)} requests, none went to v2: {set(seen)}"


def test_down_without_state_file_removes_the_gateways(gw_mesh: Mesh) -> None:
    """The daemon killed (-9) and its state file gone: `down` finds the gateway
    pods by their names like any pod's."""
    st = gw_mesh.state()
    os.kill(int(st["pid"]), signal.SIGKILL)
    (teardown.state_dir(gw_mesh.name) / "state.json").unlink()
    removed = teardown.down(gw_mesh.name)
    assert {f"netns {g['netns']}" for g in st["gateways"]} <= set(removed), removed
    deadline = time.monotonic() + 10  # a killed Envoy is a zombie until init reaps it
    while leftovers(gw_mesh.name) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(gw_mesh.name) == []


def test_a_port_no_gateway_server_has_fails_up_at_once(tmp_path: Path) -> None:
    """`ports: [8080, 9090]` where the selecting Gateway has 8080 only: 9090
    would never open, so `up` stops before starting any process and says why
    (before mesh.gateway_ports it waited for its whole --timeout)."""
    from support.env import require_kernel
    require_kernel()
    src = tmp_path / "gateway_mesh"
    shutil.copytree(HERE / "gateway_mesh", src)
    f = src / "mesh.yaml"
    f.write_text(f.read_text().replace("    ports: [8080]\n", "    ports: [8080, 9090]\n"))
    m = Mesh(f, f"gwp{os.getpid() % 100000}", fastpath="on", timeout=120)
    start = time.monotonic()
    try:
        with pytest.raises(MeshError) as exc:
            m.up()
    finally:
        m.down()
    assert "gateways.ingress.ports: [9090] is no port of the Gateway servers" in str(exc.value)
    assert time.monotonic() - start < 60, "up waited on the port instead of failing at once"
    assert leftovers(m.name) == []
