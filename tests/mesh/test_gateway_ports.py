"""A gateway's `ports:` against the Gateway servers that select it
(mesh.gateway_ports): checked before `mesh up` waits on ports that would
never open. Pure: the mesh file, its Istio policies and a state document."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mesh import gateway_ports, naming, spec, topology

GATEWAY_MESH = Path(__file__).resolve().parent / "gateway_mesh"


def unserved(tmp_path: Path, ingress_ports: str, broken_policy: bool = False) -> list[str]:
    src = tmp_path / "gateway_mesh"
    shutil.copytree(GATEWAY_MESH, src)
    if broken_policy:
        (src / "istio" / "broken.yaml").write_text("kind: [unclosed\n")
    f = src / "mesh.yaml"
    f.write_text(f.read_text().replace("    ports: [8080]\n", f"    ports: {ingress_ports}\n"))
    topo = topology.build(spec.load(f), naming.Subnet(9))
    state = tmp_path / "state.json"
    state.write_text(json.dumps(topology.state_doc(
        topo, pid=1, cgroups={p.name: "/cg" for p in topo.all_pods()}, pids={}, xds=None,
        admin=None, config_dir="/x", extra={})))
    return gateway_ports.unserved_ports(topo, state)


def test_served_ports_pass_and_an_unselected_gateway_is_left_to_up(tmp_path: Path) -> None:
    # `spare` (ports [8081]) is selected by no Gateway: `up` says it is not ready instead
    assert unserved(tmp_path, "[8080]") == []


@pytest.mark.parametrize("ports, missing", [("[9090]", "[9090] is"), ("[8080, 9090, 80]", "[9090, 80] are")])
def test_a_port_no_gateway_server_has_is_named(tmp_path: Path, ports: str, missing: str) -> None:
    lines = unserved(tmp_path, ports)
    assert len(lines) == 1, lines
    assert f"mesh.yaml: gateways.ingress.ports: {missing} no port of the Gateway servers" in lines[0]
    assert "(shop/shop-gw listen on [8080])" in lines[0], lines[0]


def test_policies_that_do_not_load_are_left_to_the_control_plane(tmp_path: Path) -> None:
    assert unserved(tmp_path, "[9090]", broken_policy=True) == []
