"""The config-source interface: anything that produces Envoy resources per node.

Owned by xds_server; implemented by xds_server.sources.files (a directory),
xds_server.sources.rest (the admin API) and other packages' sources (e.g. the
Istio relay). A server combines all its sources for each node; the same
(type, name) from two sources is an error naming both origins.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any as AnyT

import betterproto2

from xds_server.node import NodeInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeResources:
    """What one source gives one node.

    `key`: equal keys mean identical resources, so the server can build one
    snapshot (and encode it once) for all nodes that get the same config.
    `origins`: (type_url, name) -> where it came from (file name, "rest"), for errors.
    """

    key: Hashable
    resources: dict[str, list[betterproto2.Message]]
    origins: dict[tuple[str, str], str] = field(default_factory=dict)


EMPTY = NodeResources(key=("empty",), resources={})


class Source(abc.ABC):
    """A producer of per-node Envoy resources. Call `changed()` when the output changes."""

    name: str = "source"

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []
        self._reject_listeners: list[Callable[[], None]] = []

    @abc.abstractmethod
    def resources_for(self, node: NodeInfo) -> NodeResources:
        """Resources for `node` now. Must be cheap: called for every node on each change."""

    def on_change(self, cb: Callable[[], None]) -> None:
        """The server registers here; `cb` is called from the event loop."""
        self._listeners.append(cb)

    def changed(self) -> None:
        for cb in list(self._listeners):
            cb()

    def on_reject(self, cb: Callable[[], None]) -> None:
        """The server counts refused reloads here (`l7fp_config_errors_total`)."""
        self._reject_listeners.append(cb)

    def rejected(self) -> None:
        """A source calls this when it refused new input and keeps serving the old."""
        for cb in list(self._reject_listeners):
            cb()

    async def start(self) -> None:
        """Begin watching (files, upstreams). Called once by the server before serving."""
        return None

    async def stop(self) -> None:
        """Stop watching. Called once on shutdown."""
        return None

    def status(self) -> dict[str, AnyT]:
        """What /debug/adsz shows about this source."""
        return {"name": self.name}


class DuplicateResource(ValueError):
    pass


def combine(parts: list[NodeResources]) -> NodeResources:
    """Union of several sources' resources for one node; DuplicateResource on a clash."""
    if len(parts) == 1:
        return parts[0]
    resources: dict[str, list[betterproto2.Message]] = {}
    origins: dict[tuple[str, str], str] = {}
    seen: dict[tuple[str, str], str] = {}
    from xds_server.resources import resource_name

    for p in parts:
        for type_url, msgs in p.resources.items():
            for m in msgs:
                k = (type_url, resource_name(m))
                where = p.origins.get(k, "?")
                if k in seen:
                    raise DuplicateResource(
                        f"{type_url.rsplit('.', 1)[-1]} {k[1]!r} defined twice: {seen[k]} and {where}"
                    )
                seen[k] = where
                resources.setdefault(type_url, []).append(m)
        origins.update(p.origins)
    return NodeResources(tuple(p.key for p in parts), resources, origins)
