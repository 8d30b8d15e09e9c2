"""Which outbound listener's routes apply to a destination (fastpath.agent_synth)."""

from __future__ import annotations

from fastpath import plan as P
from fastpath.agent_synth import listener_destinations

SERVICES = [("198.19.0.2", (9080,)), ("198.19.0.3", (9080,)), ("198.19.0.4", (8080,))]


def _vips(lst: P.ListenerPlan) -> list[tuple[str, int]]:  # as fastpath.agent.Agent._vips
    if lst.address not in ("0.0.0.0", "::", ""):
        return [(lst.address, lst.port)]
    return [(vip, lst.port) for vip, ports in SERVICES if lst.port in ports]


def _lst(name: str, address: str, port: int, verdict: P.Verdict = P.Verdict.KERNEL
         ) -> P.ListenerPlan:
    vh = P.VirtualHost("vh", ("*",), (P.Route("r", P.RouteMatch(P.PathKind.PREFIX, "/"),
                                             P.DirectResponse(200, "x"), verdict),))
    return P.ListenerPlan(name, address, port, P.Direction.OUTBOUND, (vh,))


def test_istio_wildcard_listener_takes_every_service_vip_on_its_port() -> None:
    got = listener_destinations((_lst("0.0.0.0_9080", "0.0.0.0", 9080),), _vips)
    assert got == {("198.19.0.2", 9080): "0.0.0.0_9080", ("198.19.0.3", 9080): "0.0.0.0_9080"}


def test_a_vip_with_its_own_listener_never_takes_the_wildcards_routes() -> None:
    own_kernel = listener_destinations((_lst("0.0.0.0_9080", "0.0.0.0", 9080),
                                        _lst("198.19.0.3_9080", "198.19.0.3", 9080)), _vips)
    assert own_kernel[("198.19.0.3", 9080)] == "198.19.0.3_9080"
    # its own listener needs Envoy: the VIP is not tracked at all (Envoy serves it)
    own_envoy = listener_destinations((_lst("198.19.0.3_9080", "198.19.0.3", 9080, P.Verdict.ENVOY),
                                       _lst("0.0.0.0_9080", "0.0.0.0", 9080)), _vips)
    assert own_envoy == {("198.19.0.2", 9080): "0.0.0.0_9080"}
