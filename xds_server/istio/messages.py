"""Envoy JSON dicts -> betterproto2 messages of envoy_data_plane.

Called by `xds_server.istio.source` and `xds_server.istio.reader`. Importing
the extension modules registers their types so `typedConfig` Anys resolve.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

import betterproto2

from .sidecar import CLUSTER, ENDPOINT, LISTENER, ROUTE

_EXTENSIONS = (
    "envoy.extensions.filters.network.http_connection_manager.v3",
    "envoy.extensions.filters.network.tcp_proxy.v3",
    "envoy.extensions.filters.http.router.v3",
    "envoy.extensions.filters.http.fault.v3",
    "envoy.extensions.filters.http.cors.v3",
    "envoy.extensions.filters.http.rbac.v3",
    "envoy.extensions.filters.listener.original_dst.v3",
    "envoy.extensions.upstreams.http.v3",
    "envoy.extensions.retry.host.previous_hosts.v3",
    "envoy.config.route.v3",
)
for _mod in _EXTENSIONS:
    importlib.import_module(f"envoy_data_plane.{_mod}")

from envoy_data_plane.envoy.config.cluster.v3 import Cluster  # noqa: E402
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment  # noqa: E402
from envoy_data_plane.envoy.config.listener.v3 import Listener  # noqa: E402
from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration  # noqa: E402

CLASSES: dict[str, type[betterproto2.Message]] = {
    LISTENER: Listener, ROUTE: RouteConfiguration, CLUSTER: Cluster, ENDPOINT: ClusterLoadAssignment,
}


# betterproto2 0.9 cannot read these OutlierDetection fields from a dict (it
# mangles the digit in the name), so they are set on the message afterwards.
_OUTLIER_FIELDS = {"consecutive5xx": "consecutive_5xx",
                   "enforcingConsecutive5xx": "enforcing_consecutive_5xx"}


def _from_dict(cls: type[betterproto2.Message], item: dict[str, Any]) -> betterproto2.Message:
    od = item.get("outlierDetection")
    late = {}
    if isinstance(od, dict) and any(k in od for k in _OUTLIER_FIELDS):
        od = dict(od)
        late = {_OUTLIER_FIELDS[k]: od.pop(k) for k in list(od) if k in _OUTLIER_FIELDS}
        item = dict(item, outlierDetection=od)
    msg = cls.from_dict(item)
    for attr, value in late.items():
        setattr(msg.outlier_detection, attr, int(value))  # type: ignore[attr-defined]
    return msg


MessageCache = dict[tuple[str, str], betterproto2.Message]


def to_messages(resources: dict[str, list[dict[str, Any]]], cache: MessageCache | None = None
                ) -> dict[str, list[betterproto2.Message]]:
    """Parse every dict with its type's class; raises ValueError naming the resource.

    `cache` (owned by the caller, e.g. one per policy generation) maps a
    resource's content to its message: most resources are the same for every
    sidecar, and parsing is the expensive part. Cached messages are shared, so
    callers must not mutate them.
    """
    out: dict[str, list[betterproto2.Message]] = {}
    for type_url, items in resources.items():
        cls = CLASSES[type_url]
        msgs = []
        for item in items:
            key = (type_url, json.dumps(item, sort_keys=True)) if cache is not None else None
            hit = cache.get(key) if cache is not None and key is not None else None
            if hit is not None:
                msgs.append(hit)
                continue
            try:
                msg = _from_dict(cls, item)
            except (TypeError, ValueError, KeyError) as exc:
                name = item.get("name") or item.get("clusterName")
                raise ValueError(f"{type_url.rsplit('.', 1)[-1]} {name!r}: {exc}") from exc
            if cache is not None and key is not None:
                cache[key] = msg
            msgs.append(msg)
        out[type_url] = msgs
    return out
