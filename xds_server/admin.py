"""Admin HTTP API (aiohttp): health, Prometheus metrics, istiod-like debug pages, REST config.

Owned by xds_server.serve, which builds it with `build_admin(server, rest)`.
Other packages add pages with `admin.add_route(app, path, handler)` (e.g.
the fast path's `/debug/fastpath`) before the app starts.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any as AnyT

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from xds_server import resources as res
from xds_server.metrics import short_type
from xds_server.server import XdsServer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SERVER_KEY: web.AppKey[XdsServer] = web.AppKey("l7fp_server", XdsServer)


def build_admin(server: XdsServer) -> web.Application:
    app = web.Application()
    app[SERVER_KEY] = server
    app.router.add_get("/healthz/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/debug/syncz", _syncz)
    app.router.add_get("/debug/config_dump", _config_dump)
    app.router.add_get("/debug/adsz", _adsz)
    app.router.add_get("/", _index)
    return app


def add_route(app: web.Application, path: str, handler: Handler, method: str = "GET") -> None:
    """Add a page to the admin API; call before the app is started."""
    app.router.add_route(method, path, handler)


async def _index(request: web.Request) -> web.Response:
    paths = sorted({r.resource.canonical for r in request.app.router.routes() if r.resource})
    return web.Response(text="\n".join(paths) + "\n")


async def _ready(request: web.Request) -> web.Response:
    srv = request.app[SERVER_KEY]
    if srv.ready:
        return web.Response(text="ok\n")
    return web.Response(status=503, text="not ready\n")


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[SERVER_KEY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def syncz(srv: XdsServer) -> list[dict[str, AnyT]]:
    """Per proxy and type: sent, acked, nonce, last NACK error (istiod's /debug/syncz)."""
    out = []
    now = time.monotonic()
    for conn in sorted(srv.connections.values(), key=lambda c: c.id):
        types = {}
        for type_url, st in conn.state.types.items():
            types[short_type(type_url)] = {
                "type_url": type_url,
                "sent": st.sent_version if hasattr(st, "sent_version") else "",
                "acked": st.acked_version,
                "nonce": st.nonce,
                "pending": st.pending,
                "sends": st.sends, "acks": st.acks, "nacks": st.nacks,
                "nacked_version": st.nacked_version,
                "last_nack_error": st.last_error,
                "wildcard": st.wildcard,
                "names": sorted(st.names),
                "since_sent_s": round(now - st.sent_at, 3) if st.sent_at else None,
            }
        out.append({
            "proxy": conn.node.id, "cluster": conn.node.cluster, "stream": conn.id,
            "kind": conn.kind, "peer": conn.peer, "istio": conn.node.istio, "types": types,
        })
    return out


async def _syncz(request: web.Request) -> web.Response:
    return web.json_response(syncz(request.app[SERVER_KEY]))


async def _config_dump(request: web.Request) -> web.Response:
    srv = request.app[SERVER_KEY]
    proxy = request.query.get("proxyID") or request.query.get("proxy_id")
    if not proxy:
        return web.json_response({"error": "give ?proxyID=NODE_ID", "nodes": srv.cache.node_ids()}, status=400)
    snap = srv.cache.get(proxy)
    if snap is None:
        return web.json_response({"error": f"no snapshot for proxy {proxy!r}",
                                  "nodes": srv.cache.node_ids()}, status=404)
    configs = []
    for type_url in snap.types():
        entries = snap.of_type(type_url)
        configs.append({
            "type_url": type_url, "version": snap.version(type_url),
            "resources": [res.to_dict(e.message) for e in entries.values()],
        })
    body = {"proxy": proxy, "configs": configs, "error": srv.errors.get(proxy, "")}
    return web.json_response(body)


async def _adsz(request: web.Request) -> web.Response:
    srv = request.app[SERVER_KEY]
    conns = [{
        "stream": c.id, "proxy": c.node.id, "cluster": c.node.cluster, "kind": c.kind,
        "peer": c.peer, "connected_at": c.connected_at, "user_agent": c.node.user_agent,
        "istio": c.node.istio, "watched_types": [short_type(t) for t in c.state.types],
    } for c in sorted(srv.connections.values(), key=lambda c: c.id)]
    body = {
        "connections": conns,
        "nodes": {n: srv.cache.entry(n).snapshot.summary()  # type: ignore[union-attr]
                  for n in srv.cache.node_ids()},
        "snapshot_errors": srv.errors,
        "sources": [s.status() for s in srv.sources],
        "last_push": srv.last_push,
        "fastpath": {"split": srv.splitter is not None, "plans": sorted(srv.plans)},
    }
    return web.json_response(body)
