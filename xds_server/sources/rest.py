"""Config source fed through the admin API: put/delete resources per node.

Owned by xds_server.serve, which creates one RestSource and mounts its routes
on the admin app with `mount(app, server, source)`:

  GET    /config/nodes/{node}/resources              what REST gives this node
  PUT    /config/nodes/{node}/resources              body: {"resources": [...]} (JSON or YAML,
                                                     the config-file format); replaces or adds
                                                     by (type, name)
  DELETE /config/nodes/{node}/resources              all REST resources of the node
  DELETE /config/nodes/{node}/resources/{type}/{name}  one resource (type: cds/eds/lds/rds/sds
                                                     or a full type URL)

`{node}` is a node id, or `*` for every node. Changes are validated like
files (parse, then the node's whole snapshot must resolve) before they apply:
a 400 names the bad field or reference and nothing changes.
"""

from __future__ import annotations

import itertools
from typing import Any as AnyT

import betterproto2
import yaml
from aiohttp import web

from xds_server import consistency, yaml_errors
from xds_server import resources as res
from xds_server.node import NodeInfo
from xds_server.snapshot import Snapshot
from xds_server.sources.base import DuplicateResource, NodeResources, Source, combine

ALL = "*"
_gen = itertools.count(1)
LONG_TYPES = {v: k for k, v in res.SHORT_NAMES.items()}


class RestSource(Source):
    name = "rest"

    def __init__(self) -> None:
        super().__init__()
        # node id (or "*") -> (type_url, name) -> message
        self.by_node: dict[str, dict[tuple[str, str], betterproto2.Message]] = {}
        self._gen = next(_gen)

    def resources_for(self, node: NodeInfo) -> NodeResources:
        items = {**self.by_node.get(ALL, {}), **self.by_node.get(node.id, {})}
        by_type: dict[str, list[betterproto2.Message]] = {}
        for (type_url, _), m in sorted(items.items()):
            by_type.setdefault(type_url, []).append(m)
        key = ("rest", self._gen, ALL in self.by_node, node.id if node.id in self.by_node else "")
        origins = {k: "rest" for k in items}
        return NodeResources(key, by_type, origins)

    def replace(self, node_id: str, items: dict[tuple[str, str], betterproto2.Message]) -> None:
        if items:
            self.by_node[node_id] = items
        else:
            self.by_node.pop(node_id, None)
        self._gen = next(_gen)
        self.changed()

    def status(self) -> dict[str, AnyT]:
        return {"name": self.name, "nodes": {n: len(v) for n, v in self.by_node.items()}}


def mount(app: web.Application, server: AnyT, source: RestSource) -> None:
    base = "/config/nodes/{node}/resources"
    api = _Api(server, source)
    app.router.add_get(base, api.get)
    app.router.add_put(base, api.put)
    app.router.add_delete(base, api.delete_all)
    app.router.add_delete(base + "/{type}/{name}", api.delete_one)


class _Api:
    def __init__(self, server: AnyT, source: RestSource) -> None:
        self.server = server
        self.source = source

    async def get(self, request: web.Request) -> web.Response:
        items = self.source.by_node.get(request.match_info["node"], {})
        return web.json_response({"resources": [res.to_dict(m) for m in items.values()]})

    async def put(self, request: web.Request) -> web.Response:
        node_id = request.match_info["node"]
        try:
            doc = yaml.safe_load(await request.text())
        except yaml.YAMLError as exc:
            return _bad(f"body: not valid YAML/JSON: {yaml_errors.problem(exc)}")
        items = doc.get("resources") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            return _bad("body: expected a mapping with a 'resources:' list")
        new = dict(self.source.by_node.get(node_id, {}))
        for i, item in enumerate(items):
            try:
                msg = res.parse_resource(item, f"resources[{i}]")
            except res.ResourceError as exc:
                return _bad(str(exc))
            new[(item["@type"], res.resource_name(msg))] = msg
        return self._apply(node_id, new)

    async def delete_all(self, request: web.Request) -> web.Response:
        return self._apply(request.match_info["node"], {})

    async def delete_one(self, request: web.Request) -> web.Response:
        node_id = request.match_info["node"]
        t = request.match_info["type"]
        type_url = LONG_TYPES.get(t, t)
        if "/" not in type_url:  # `.../resources/cluster/x`: say what the path takes
            return _bad(f"type {t!r}: expected one of {', '.join(sorted(LONG_TYPES))} or a type URL")
        new = dict(self.source.by_node.get(node_id, {}))
        if new.pop((type_url, request.match_info["name"]), None) is None:
            return web.json_response({"error": f"no {t} {request.match_info['name']!r} for node {node_id!r}"},
                                     status=404)
        return self._apply(node_id, new)

    def _apply(self, node_id: str, new: dict[tuple[str, str], betterproto2.Message]) -> web.Response:
        problem = self._check(node_id, new)
        if problem:
            return _bad(problem)
        self.source.replace(node_id, new)
        return web.json_response({"ok": True, "node": node_id, "resources": len(new)})

    def _check(self, node_id: str, new: dict[tuple[str, str], betterproto2.Message]) -> str:
        """Would every affected node's snapshot still resolve? '' if yes."""
        old = self.source.by_node.get(node_id)
        self.source.by_node[node_id] = new
        try:
            nodes = list(self.server.nodes.values()) if node_id == ALL else [
                self.server.nodes.get(node_id) or NodeInfo(node_id)]
            for node in nodes:
                parts = combine([s.resources_for(node) for s in self.server.sources])
                consistency.check(Snapshot.from_messages(parts.resources, parts.origins))
        except (consistency.InconsistentSnapshot, DuplicateResource) as exc:
            return str(exc)
        finally:
            if old is None:
                self.source.by_node.pop(node_id, None)
            else:
                self.source.by_node[node_id] = old
        return ""


def _bad(problem: str) -> web.Response:
    return web.json_response({"error": problem}, status=400)
