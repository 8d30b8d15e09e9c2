"""The split: one node's Envoy resources -> KernelPlan + residual Envoy config.

Called by `xds_server` for every node snapshot before it is published (see
docs/contracts.md, "Snapshot transform"). Owned by `fastpath.split`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastpath.plan import KernelPlan


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


def split_snapshot(node_id: str, resources: Mapping[str, Sequence[Any]]) -> SplitResult:
    """Split ``resources`` (type URL -> betterproto2 messages) for ``node_id``."""
    plan = KernelPlan(node_id=node_id, version=_version(resources))
    return SplitResult(plan=plan, residual={k: list(v) for k, v in resources.items()})
