"""`l7fp istio check|config` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BOOKINFO = ["--mesh-file", str(HERE / "bookinfo" / "mesh.yaml")]


def l7fp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xds_server", "--log-level", "error", *args],
                          capture_output=True, text=True, timeout=120, cwd=HERE.parents[1])


def test_check_clean_and_with_warnings(tmp_path: Path) -> None:
    ok = l7fp("istio", "check", str(HERE / "bookinfo" / "policies.yaml"), *BOOKINFO)
    assert (ok.returncode, ok.stdout) == (0, ""), ok.stderr
    assert "5 objects, 4 services, 6 sidecars, 0 warnings" in ok.stderr
    (tmp_path / "vs.yaml").write_text("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r}
spec:
  hosts: [nowhere]
  http: [{route: [{destination: {host: reviews}}], sparkle: 1}]
""")
    bad = l7fp("istio", "check", str(tmp_path), *BOOKINFO)
    assert bad.returncode == 1
    assert bad.stdout.splitlines() == [
        "VirtualService default/r: spec.hosts[0]: 'nowhere' matches no service of the registry "
        "(--mesh-file/--k8s/ServiceEntry); no route"]
    (tmp_path / "broken.yaml").write_text("kind: [\n")
    assert l7fp("istio", "check", str(tmp_path)).returncode == 2


def test_config_prints_the_sidecars_resources() -> None:
    node = "sidecar~198.18.0.15~details-v1.default~default.svc.cluster.local"
    r = l7fp("istio", "config", str(HERE / "bookinfo" / "policies.yaml"), *BOOKINFO, "--node", node)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    (inbound,) = [x for x in out["type.googleapis.com/envoy.config.listener.v3.Listener"]
                  if x["name"] == "virtualInbound"]
    filters = inbound["filterChains"][0]["filters"][0]["typedConfig"]["httpFilters"]
    assert [f["name"] for f in filters][:2] == ["envoy.filters.http.rbac.deny", "envoy.filters.http.rbac"]


def test_config_of_a_node_that_is_no_pod_is_an_error() -> None:
    """A typo in --node printed the config of a pod that does not exist (exit 0)."""
    r = l7fp("istio", "config", str(HERE / "bookinfo" / "policies.yaml"), *BOOKINFO,
             "--node", "sidecar~198.18.9.9~detials-v1.default~default.svc.cluster.local")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.startswith("l7fp istio: --node 'sidecar~198.18.9.9~detials-v1.default~")
    assert "no pod of --mesh-file/--k8s" in r.stderr and "details-v1" not in r.stderr.split("pods:")[0]


def test_check_says_each_warning_once(tmp_path: Path) -> None:
    """Without --log-level error, the importer's log line doubled every warning on a terminal."""
    (tmp_path / "vs.yaml").write_text("apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
                                      "metadata: {name: r}\nspec: {hosts: [nowhere], http: []}\n")
    r = subprocess.run([sys.executable, "-m", "xds_server", "istio", "check", str(tmp_path), *BOOKINFO],
                       capture_output=True, text=True, timeout=120, cwd=HERE.parents[1])
    assert r.returncode == 1
    assert (r.stdout + r.stderr).count("'nowhere' matches no service") == 1, r.stdout + r.stderr


def test_check_and_config_of_an_istio_gateway() -> None:
    """`check` says which Gateway servers are not served; `config` prints a
    router node's listeners when given the labels its Gateway selects."""
    gw = HERE / "gateway"
    args = [str(gw / "policies"), "--mesh-file", str(gw / "mesh.yaml")]
    r = l7fp("istio", "check", *args)
    assert r.returncode == 1
    assert [line.split(":")[:2] for line in r.stdout.splitlines() if line.startswith("Gateway ")] == [
        ["Gateway default/shop-gw", " spec.servers[1] (port 8443, https)"],
        ["Gateway default/shop-gw", " spec.servers[2] (port 9443, tls-pass)"],
        ["Gateway default/shop-gw", " spec.servers[3] (port 5432, tcp-db)"],
        ["Gateway istio-system/edge", " spec.listeners[1] (port 8444, https)"]]
    node = "router~198.18.0.130~gw-1.istio-system~istio-system.svc.cluster.local"
    r = l7fp("istio", "config", *args, "--node", node, "--labels",
             "istio=ingressgateway,gateway.networking.k8s.io/gateway-name=edge")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [x["name"] for x in out["type.googleapis.com/envoy.config.listener.v3.Listener"]] == [
        "0.0.0.0_8080", "0.0.0.0_8081"]
