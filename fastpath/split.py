"""The split: one node's Envoy resources -> KernelPlan + residual Envoy config.

Called by `xds_server` for every node snapshot before it is published (see
docs/contracts.md, "Snapshot transform"), and by `l7fp split`. Owned by
`fastpath.split`. The classifier is `fastpath.classify` (verdicts and reasons),
the residual is `fastpath.residual` (what Envoy keeps).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastpath import envoy_model as em
from fastpath.classify import Resources, build
from fastpath.classify_route import KernelCaps
from fastpath.plan import KernelPlan
from fastpath.residual import residual


@dataclass(frozen=True)
class SplitResult:
    """``plan`` goes to the BPF agent; ``residual`` (type URL -> messages) to Envoy."""

    plan: KernelPlan
    residual: dict[str, list[Any]]


def _version(resources: Mapping[str, Sequence[Any]]) -> str:
    h = hashlib.sha256()
    for type_url in sorted(resources):
        for msg in resources[type_url]:
            h.update(type_url.encode())
            h.update(bytes(msg))
    return h.hexdigest()[:16]


def resources_json(resources: Mapping[str, Sequence[Any]]) -> Resources:
    """The proto-JSON view of ``resources`` (type URL -> betterproto2 messages)."""
    def js(url: str) -> list[dict[str, Any]]:
        return [em.to_json(m) for m in resources.get(url, [])]

    rcs = {str(d.get("name", "")): d for d in js(em.ROUTE)}
    eps = {str(d.get("clusterName", "")): d for d in js(em.ENDPOINT)}
    return Resources(js(em.LISTENER), rcs, js(em.CLUSTER), eps)


def plan_of(node_id: str, res: Resources, version: str = "",
            caps: KernelCaps | None = None, orphans: bool = False) -> KernelPlan:
    """The KernelPlan of already-decoded resources."""
    listeners, clusters = build(res, caps, orphans)
    return KernelPlan(node_id=node_id, version=version, listeners=listeners, clusters=clusters)


def split_snapshot(node_id: str, resources: Mapping[str, Sequence[Any]],
                   caps: KernelCaps | None = None) -> SplitResult:
    """Split ``resources`` (type URL -> betterproto2 messages) for ``node_id``."""
    res = resources_json(resources)
    plan = plan_of(node_id, res, _version(resources), caps)
    return SplitResult(plan=plan, residual=residual(resources, plan))
