"""Who is on the other end of a stream: the Envoy node, with Istio's id form parsed.

Built by xds_server.server from the first request of a stream; read by the
config sources (node selectors) and the debug endpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any as AnyT


@dataclass(frozen=True)
class NodeInfo:
    """A proxy's identity. `istio` holds the parts of an Istio sidecar id, if it is one."""

    id: str
    cluster: str = ""
    metadata: dict[str, AnyT] = field(default_factory=dict, compare=False, hash=False)
    istio: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    user_agent: str = ""

    @classmethod
    def from_proto(cls, node: AnyT) -> NodeInfo:
        """From an envoy.config.core.v3.Node; ValueError if it has no id."""
        if node is None or not node.id:
            raise ValueError("request has no node id")
        meta: dict[str, AnyT] = {}
        if getattr(node, "metadata", None) is not None:
            try:
                meta = node.metadata.to_dict()
            except Exception:  # noqa: BLE001 - metadata is informational only
                meta = {}
        agent = f"{node.user_agent_name} {getattr(node, 'user_agent_version', '')}".strip()
        return cls(node.id, node.cluster or "", meta, parse_istio_id(node.id), agent)


def parse_istio_id(node_id: str) -> dict[str, str]:
    """Split `sidecar~IP~POD.NS~NS.svc.cluster.local` (also router~...); {} otherwise."""
    parts = node_id.split("~")
    if len(parts) != 4 or parts[0] not in ("sidecar", "router"):
        return {}
    kind, ip, pod_ns, domain = parts
    pod, _, ns = pod_ns.rpartition(".")
    if not pod:
        pod, ns = pod_ns, ""
    return {"type": kind, "ip": ip, "pod": pod, "namespace": ns, "domain": domain}
