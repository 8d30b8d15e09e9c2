"""`l7fp serve --policies DIR`: a config Source generating istiod-style sidecar xDS.

Created by `xds_server.istio.serve_plugin.make_sources`; the XdsServer calls
`resources_for(node)` for every connected proxy (sidecars, and Istio gateways:
`router~...` node ids get their Gateways' listeners, xds_server.istio.gateway). Owns the loaded `Mesh`
(policies + registry) and reloads it when a watched file changes. A policy
directory that does not load keeps the previous good config serving; the
error is logged once and shown on /debug/adsz.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from xds_server.node import NodeInfo
from xds_server.sources.base import NodeResources, Source

from ..tasks import cancel_and_wait
from . import load
from .messages import MessageCache, to_messages
from .registry import STATE_ROOT
from .sidecar import Mesh, generate

log = logging.getLogger(__name__)


class IstioSource(Source):
    """Per-node resources generated from Istio / Gateway API YAML."""

    name = "istio"

    def __init__(self, policies: str, mesh_file: str | None = None, k8s: str | None = None,
                 inbound_address: str = "127.0.0.1", poll: float = 1.0,
                 capture_ports: tuple[int, int] = (15001, 15006)) -> None:
        super().__init__()
        self.policies, self.mesh_file, self.k8s = policies, mesh_file, k8s
        self.inbound_address = inbound_address
        self.capture_ports = capture_ports
        self.poll = poll
        self.mesh: Mesh | None = None
        self.generation = 0
        self.error = ""
        self._cache: dict[str, NodeResources] = {}
        self._messages: MessageCache = {}  # resource content -> message, per policy generation
        self._stamps: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    # -- loading ----------------------------------------------------------
    def load(self) -> bool:
        """(Re)read everything; on failure keep the previous Mesh and return False."""
        try:
            mesh = load(self.policies, self.mesh_file, self.k8s, self.inbound_address,
                        self.capture_ports)
        except (ValueError, OSError, KeyError, TypeError) as exc:
            self.error = str(exc)
            log.error("istio policies not loaded, previous config stays: %s", exc)
            return False
        if self.mesh is not None:  # keep what connected sidecars taught the registry
            for w in self.mesh.reg.workloads:
                if w.ip:
                    mesh.reg.learn(w.name, w.namespace, w.ip, w.labels)
        self.mesh, self.error = mesh, ""
        self.generation += 1
        self._cache.clear()
        self._messages = {}
        log.info("istio policies loaded: %d objects, %d warnings", mesh.objs.count(),
                 len(mesh.objs.warnings))
        return True

    def _watched(self) -> list[Path]:
        paths = [Path(p) for p in (self.policies, self.mesh_file, self.k8s) if p]
        if self.mesh_file:
            paths.append(STATE_ROOT / Path(self.mesh_file).parent.name / "state.json")
        out = []
        for p in paths:
            out += [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else []
        return out

    def _stamp(self) -> dict[str, float]:
        stamps = {}
        for p in self._watched():
            with contextlib.suppress(OSError):
                stamps[str(p)] = p.stat().st_mtime
        return stamps

    async def start(self) -> None:
        if self.mesh is None and not self.load():
            raise SystemExit(f"l7fp serve: --policies {self.policies} does not load: {self.error}")
        self._stamps = self._stamp()
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            stamps = self._stamp()
            if stamps != self._stamps:
                self._stamps = stamps
                if self.load():
                    self.changed()

    # -- serving ----------------------------------------------------------
    def resources_for(self, node: NodeInfo) -> NodeResources:
        if self.mesh is None and not self.load():
            return NodeResources(("istio", "unloaded"), {})
        assert self.mesh is not None
        self._learn(node)
        hit = self._cache.get(node.id)
        if hit is not None:
            return hit
        dicts = generate(self.mesh, node.id, _labels(node))
        if len(self._messages) > 100_000:  # endpoints learnt one by one leave stale entries
            self._messages = {}
        msgs = to_messages(dicts, self._messages)
        origins = {(t, str(d.get("name") or d.get("clusterName"))): f"istio:{self.policies}"
                   for t, items in dicts.items() for d in items}
        out = NodeResources(("istio", self.generation, node.id), msgs, origins)
        self._cache[node.id] = out
        return out

    def _learn(self, node: NodeInfo) -> None:
        """Fill the registry from the sidecar's node id and LABELS metadata."""
        ist = node.istio
        if not ist or self.mesh is None:
            return
        if self.mesh.reg.learn(ist.get("pod", ""), ist.get("namespace", ""), ist.get("ip", ""),
                               _labels(node)):
            self._cache.clear()
            self.generation += 1
            try:  # push the news to every sidecar after this rebuild
                asyncio.get_running_loop().call_soon(self.changed)
            except RuntimeError:  # no loop (direct call from a test): nothing to notify
                pass

    def status(self) -> dict[str, Any]:
        mesh = self.mesh
        return {"name": self.name, "policies": self.policies, "mesh_file": self.mesh_file,
                "k8s": self.k8s, "generation": self.generation, "error": self.error,
                "objects": mesh.objs.count() if mesh else 0,
                "warnings": list(mesh.objs.warnings) if mesh else []}


def _labels(node: NodeInfo) -> dict[str, str]:
    """The proxy's labels from its node metadata `LABELS`, as Istio's proxies send them."""
    labels = node.metadata.get("LABELS") or node.metadata.get("labels") or {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
