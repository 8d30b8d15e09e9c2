"""The split: one node's Envoy resources -> KernelPlan + residual Envoy config.

Called by `xds_server` for every node snapshot before it is published (see
docs/contracts.md, "Snapshot transform"), and by `l7fp split`. Owned by
`fastpath.split`. The classifier is `fastpath.classify` (verdicts and reasons),
the residual is `fastpath.residual` (what Envoy keeps).
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastpath import envoy_model as em
from fastpath.classify import Resources, build
from fastpath.classify_route import KernelCaps
from fastpath.plan import KernelPlan
from fastpath.residual import residual


@dataclass(frozen=True)
class SplitResult:
    """``plan`` goes to the BPF agent; a residual (type URL -> messages) to Envoy.

    ``residual``: served while the kernel owns the node's rate limiters (the
    agent runs the plan's buckets): Envoy's limiter is off on the KERNEL routes.
    ``envoy_residual``: served otherwise (no agent, inline decision, plan not
    applied yet): every limiter stays in Envoy (rule 3, docs/contracts.md)."""

    plan: KernelPlan
    residual: dict[str, list[Any]]
    envoy_residual: dict[str, list[Any]] = field(default_factory=dict)


# Wire bytes by message object. Snapshot messages are immutable once published
# (xds_server encodes them once for every stream), so the same object gives the
# same bytes; betterproto2's serialisation is too slow to repeat on every push.
# Messages aren't hashable, so the key is id() guarded by a weak reference
# (an entry goes away with its message, and a reused id never matches).
_WIRE: dict[int, tuple[weakref.ref[Any], bytes]] = {}


def _bytes(msg: Any) -> bytes:
    hit = _WIRE.get(id(msg))
    if hit is not None and hit[0]() is msg:
        return hit[1]
    raw = bytes(msg)
    key = id(msg)

    def forget(_ref: weakref.ref[Any]) -> None:
        _WIRE.pop(key, None)

    try:
        _WIRE[key] = (weakref.ref(msg, forget), raw)
    except TypeError:  # not weak-referenceable: no caching
        pass
    return raw


def _wire(resources: Mapping[str, Sequence[Any]]) -> dict[str, list[bytes]]:
    return {url: [_bytes(m) for m in msgs] for url, msgs in resources.items()}


def _version(wire: Mapping[str, Sequence[bytes]]) -> str:
    h = hashlib.sha256()
    for type_url in sorted(wire):
        for raw in wire[type_url]:
            h.update(type_url.encode())
            h.update(raw)
    return h.hexdigest()[:16]


def resources_json(resources: Mapping[str, Sequence[Any]],
                   wire: Mapping[str, Sequence[bytes]] | None = None) -> Resources:
    """The proto-JSON view of ``resources`` (type URL -> betterproto2 messages)."""
    def js(url: str) -> list[dict[str, Any]]:
        raws = wire.get(url) if wire else None
        msgs = resources.get(url, [])
        return [em.to_json(m, raws[i] if raws else None) for i, m in enumerate(msgs)]

    rcs = {str(d.get("name", "")): d for d in js(em.ROUTE)}
    eps = {str(d.get("clusterName", "")): d for d in js(em.ENDPOINT)}
    return Resources(js(em.LISTENER), rcs, js(em.CLUSTER), eps)


def plan_of(node_id: str, res: Resources, version: str = "",
            caps: KernelCaps | None = None, orphans: bool = False,
            executable: bool = True) -> KernelPlan:
    """The KernelPlan of already-decoded resources.

    ``executable`` (the default; what the control plane and `l7fp split` use):
    routes the synthesized decision would punt are ENVOY (`synth.executable_plan`).
    False gives the classifier's plan, what the IR and the reference model can
    express: the differential tests of the model use it."""
    from fastpath.synth import executable_plan

    listeners, clusters = build(res, caps, orphans)
    plan = KernelPlan(node_id=node_id, version=version, listeners=listeners, clusters=clusters)
    return executable_plan(plan) if executable else plan


def split_snapshot(node_id: str, resources: Mapping[str, Sequence[Any]],
                   caps: KernelCaps | None = None) -> SplitResult:
    """Split ``resources`` (type URL -> betterproto2 messages) for ``node_id``."""
    wire = _wire(resources)
    res = resources_json(resources, wire)
    plan = plan_of(node_id, res, _version(wire), caps)
    return SplitResult(plan=plan, residual=residual(resources, plan),
                       envoy_residual=residual(resources, plan, kernel_owns_limits=False))
