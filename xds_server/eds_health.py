"""EDS health overlay: hosts another detector ejected, marked UNHEALTHY in a node's residual.

Owned by xds_server.server (`XdsServer.set_endpoint_health`); the provider is
the fast-path agent, whose kernel owns outlier detection for some clusters of
the node (DESIGN.md rule 3: one owner). The kernel's LB view leaves a host out;
the node's Envoy must skip it too, so its ClusterLoadAssignment carries the
host with `health_status: UNHEALTHY`. Envoy 1.40 then treats it as it treats
an outlier-ejected host: skipped by the LB, counted unhealthy for the panic
threshold (`healthy_panic_threshold`), and the change applies at once (not
held by `update_merge_window`): tests/xds/test_eds_health.py. DRAINING was
seen to behave the same there (skipped alone, panic with both hosts marked);
UNHEALTHY says what it is.

Pure functions over resource dicts (type URL -> messages); messages are never
changed in place (snapshots share them), a marked CLA is a new copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import HealthStatus
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment

ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"

# ClusterLoadAssignment name (an EDS cluster's eds_cluster_config service_name,
# else the cluster's name) -> "address:port" of the hosts out of the owner's LB view
HostsOut = Mapping[str, frozenset[str]]


def key(out: HostsOut) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A hashable, order-free form of `out` (empty clusters dropped): memo keys."""
    return tuple(sorted((c, tuple(sorted(h))) for c, h in out.items() if h))


def overlay(resources: Mapping[str, Sequence[Any]], out: HostsOut) -> dict[str, list[Any]]:
    """`resources` with the hosts of `out` UNHEALTHY in their cluster's CLA.
    A host listed but not in the CLA is ignored (the plan and EDS disagree for
    one push at most); other types and clusters are the same objects."""
    res = {t: list(v) for t, v in resources.items()}
    if not key(out):
        return res
    res[ENDPOINT] = [_mark(cla, out.get(cla.cluster_name, frozenset()))
                     for cla in res.get(ENDPOINT, [])]
    return res


def with_detectors(resources: Mapping[str, Sequence[Any]],
                   envoy: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
    """`resources` (a kernel-owned residual) whose Clusters have the
    outlier_detection they have in `envoy` (the residual that keeps Envoy's
    own policy) back: while the kernel hears nothing of Envoy's path, Envoy's
    detector stays. Changed Clusters are new copies."""
    det = {c.name: c.outlier_detection for c in envoy.get(CLUSTER, [])
           if isinstance(c, Cluster) and c.outlier_detection is not None}
    res = {t: list(v) for t, v in resources.items()}
    if det:
        res[CLUSTER] = [_with_detector(c, det) for c in res.get(CLUSTER, [])]
    return res


def _with_detector(c: Any, det: Mapping[str, Any]) -> Any:
    if not isinstance(c, Cluster) or c.outlier_detection is not None or c.name not in det:
        return c
    copy = Cluster.FromString(bytes(c))
    copy.outlier_detection = det[c.name]
    return copy


def _mark(cla: ClusterLoadAssignment, hosts: frozenset[str]) -> ClusterLoadAssignment:
    if not hosts or not isinstance(cla, ClusterLoadAssignment) or not any(_host(lbe) in hosts for lo in cla.endpoints for lbe in lo.lb_endpoints):
        return cla
    copy = ClusterLoadAssignment.FromString(bytes(cla))
    for lo in copy.endpoints:
        for lbe in lo.lb_endpoints:
            if _host(lbe) in hosts:
                lbe.health_status = HealthStatus.UNHEALTHY
    return copy


def _host(lbe: Any) -> str:
    sa = getattr(getattr(getattr(lbe, "endpoint", None), "address", None), "socket_address", None)
    if sa is None:
        return ""
    return f"{sa.address}:{sa.port_value}"
