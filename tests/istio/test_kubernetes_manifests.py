"""compose/kubernetes: every manifest passes the Kubernetes JSON schema (offline, strict).

kubernetes-validate bundles the schemas, so no cluster is needed. Also checks
the wiring between the objects (selectors, ports, the relay's upstream).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

kv = pytest.importorskip("kubernetes_validate")
DIR = Path(__file__).resolve().parents[2] / "compose" / "kubernetes"
K8S_VERSION = "1.30.0"


def docs() -> list[dict]:
    out = []
    for f in sorted(DIR.glob("*.yaml")):
        out += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return out


@pytest.mark.parametrize("doc", docs(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_matches_kubernetes_schema(doc: dict) -> None:
    kv.validate(doc, K8S_VERSION, strict=True)


def test_manifest_wiring() -> None:
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs()}
    ds = by[("DaemonSet", "l7fp-node")]
    pod = ds["spec"]["template"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    svc = by[("Service", "l7fp-xds")]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["internalTrafficPolicy"] == "Local"  # each sidecar reaches its node's relay
    args = pod["spec"]["containers"][0]["args"]
    up = by[("Service", "istiod-upstream")]
    assert f"--upstream-xds={up['metadata']['name']}.istio-system.svc:15010" in args
    assert pod["spec"]["serviceAccountName"] in {n for k, n in by if k == "ServiceAccount"}
    # the arguments are the real CLI's
    from xds_server.cli import build_parser

    ns = build_parser().parse_args(args)
    assert ns.upstream_xds == "istiod-upstream.istio-system.svc:15010" and ns.fastpath == "on"


@pytest.mark.parametrize("spec", [{"ports": [{"port": "not-a-number"}]}, {"bogusField": 1}])
def test_schema_check_catches_a_bad_manifest(spec: dict) -> None:
    with pytest.raises(kv.ValidationError):
        kv.validate({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": spec},
                    K8S_VERSION, strict=True)
