"""Relay mode, `l7fp serve --upstream-xds HOST:PORT`: L7FP between sidecars and istiod.

A `l7fp serve` plugin (see xds_server.serve). For each connected sidecar the
`RelaySource` opens one SotW ADS stream to the upstream control plane with
the sidecar's own node (id, cluster, metadata), so the upstream generates
exactly the config it would give that sidecar. What arrives is served to the
sidecar through the normal pipeline (split -> residual, kernel plan). The
sidecar's ACK/NACK of the result is passed upstream (a NACK carries the
sidecar's error_detail), so the upstream's debug pages and reject metrics
see them. When the upstream is unreachable the last config keeps serving and
the session reconnects with backoff.

At startup one TCP connect (`probe`) says in one warning line when nothing
answers at HOST:PORT; serving goes on (istiod may come up later).

Owns: the upstream sessions (one asyncio task each) and the startup check. Reads the XdsServer's
connections and cache (given through `setup`) to learn the sidecar's verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import grpclib.const
import grpclib.exceptions
from grpclib.client import Channel

from xds_server.node import NodeInfo
from xds_server.relay_protocol import Request, UpstreamState
from xds_server.sources.base import NodeResources, Source
from xds_server.tasks import cancel_and_wait

log = logging.getLogger(__name__)
ADS_PATH = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)
PROBE_TIMEOUT = 2.0  # the startup check's one TCP connect


async def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str:
    """One TCP connect to the upstream: '' when it answers, else why not (the
    error's words). Called once by RelaySource.start: sessions only dial when a
    sidecar connects, so without it a wrong --upstream-xds was silent until then."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return f"no answer in {timeout:g}s"
    except OSError as exc:  # refused, unreachable, a name that does not resolve
        if exc.errno and exc.errno > 0:  # asyncio's strerror repeats the address
            return os.strerror(exc.errno)
        return exc.strerror or str(exc)  # a name lookup's error (negative errno) has its words
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return ""


class UpstreamSession:
    """One sidecar's ADS stream to the upstream, reconnecting until closed."""

    def __init__(self, node: NodeInfo, host: str, port: int, on_change: Any) -> None:
        self.node, self.host, self.port = node, host, port
        self.state = UpstreamState()
        self.on_change = on_change
        self.connected = False
        self.last_error = ""
        self.connects = 0
        self.verdicts: dict[str, int] = {"ack": 0, "nack": 0}
        self._out: asyncio.Queue[Request] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        await cancel_and_wait(self._task, ignore_errors=True)

    def send(self, req: Request | None) -> None:
        if req is not None:
            self.verdicts["nack" if req.error else "ack"] += 1
            self._out.put_nowait(req)

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._stream()
                attempt = 0
            except (OSError, TimeoutError, grpclib.exceptions.GRPCError,
                    grpclib.exceptions.StreamTerminatedError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
            self.connected = False
            delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
            attempt += 1
            log.warning("relay: upstream %s:%d for %s: %s; last config keeps serving, retry in %.1fs",
                        self.host, self.port, self.node.id, self.last_error or "stream ended", delay)
            await asyncio.sleep(delay)

    async def _stream(self) -> None:
        from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryRequest, DiscoveryResponse

        channel = Channel(self.host, self.port)
        try:
            async with channel.request(ADS_PATH, grpclib.const.Cardinality.STREAM_STREAM,
                                       DiscoveryRequest, DiscoveryResponse) as stream:
                self._out = asyncio.Queue()
                first = True
                for req in self.state.start():
                    await stream.send_message(self._message(req, first))
                    first = False
                self.connected, self.last_error = True, ""
                self.connects += 1
                sender = asyncio.create_task(self._sender(stream))
                try:
                    async for resp in stream:
                        self._receive(resp)
                finally:
                    sender.cancel()
        finally:
            channel.close()

    async def _sender(self, stream: Any) -> None:
        while True:
            req = await self._out.get()
            await stream.send_message(self._message(req, False))

    def _receive(self, resp: Any) -> None:
        items = [(a.type_url, a.value) for a in resp.resources]
        log.debug("relay: %s v%s (%d resources) for %s", resp.type_url, resp.version_info,
                  len(items), self.node.id)
        for req in self.state.receive(resp.type_url, resp.version_info, resp.nonce, items):
            if req.error:
                self.send(req)
            else:
                self._out.put_nowait(req)
        self.on_change()

    def _message(self, req: Request, with_node: bool) -> Any:
        from envoy_data_plane.envoy.config.core.v3 import Node
        from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryRequest
        from envoy_data_plane.google.rpc import Status

        msg = DiscoveryRequest(type_url=req.type_url, version_info=req.version,
                               response_nonce=req.nonce, resource_names=list(req.names))
        if with_node or not self.connected:
            msg.node = Node.from_dict({"id": self.node.id, "cluster": self.node.cluster,
                                       "metadata": self.node.metadata or {}})
        if req.error:
            msg.error_detail = Status(code=3, message=req.error)  # INVALID_ARGUMENT, as Envoy
        return msg

    def status(self) -> dict[str, Any]:
        return {"node": self.node.id, "connected": self.connected, "connects": self.connects,
                "last_error": self.last_error, "verdicts": dict(self.verdicts),
                "acked": {t.rsplit(".", 1)[-1]: st.acked_version for t, st in self.state.types.items()},
                "pending": [t.rsplit(".", 1)[-1] for t, st in self.state.types.items() if st.pending]}


class RelaySource(Source):
    """Per-node resources relayed from the upstream control plane."""

    name = "relay"

    def __init__(self, host: str, port: int, poll: float = 0.05) -> None:
        super().__init__()
        self.host, self.port, self.poll = host, port, poll
        self.sessions: dict[str, UpstreamSession] = {}
        self.server: Any = None
        self._served_gen: dict[str, int] = {}
        self._seen_nacks: dict[tuple[str, str], int] = {}
        self._task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        # the startup check (probe): None until it is done, then {"ok", "error", "at"}
        self.startup_probe: dict[str, Any] | None = None

    def resources_for(self, node: NodeInfo) -> NodeResources:
        sess = self.sessions.get(node.id)
        if sess is None:
            sess = UpstreamSession(node, self.host, self.port, self._upstream_changed)
            self.sessions[node.id] = sess
            sess.start()
        gen = sess.state.generation
        self._served_gen[node.id] = gen
        resources = sess.state.resources()
        origins = {(t, _name(m)): f"upstream {self.host}:{self.port}"
                   for t, msgs in resources.items() for m in msgs}
        return NodeResources(("relay", node.id, gen), resources, origins)

    def _upstream_changed(self) -> None:
        self.changed()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._verdicts())
        self._probe_task = asyncio.create_task(self._probe())  # in the background: serve starts now

    async def _probe(self) -> None:
        """Say at startup, in one line, that nothing answers at the upstream. Not
        an exit: istiod may come up later, and the sessions retry with backoff."""
        error = await probe(self.host, self.port)
        self.startup_probe = {"ok": not error, "error": error, "at": time.time()}
        if error:
            log.warning("relay: upstream --upstream-xds %s:%d does not answer: %s; serving anyway, "
                        "each sidecar's upstream stream retries with backoff",
                        self.host, self.port, error)
        else:
            log.info("relay: upstream %s:%d answers (TCP)", self.host, self.port)

    async def stop(self) -> None:
        await cancel_and_wait(self._probe_task)
        await cancel_and_wait(self._task)
        for sess in list(self.sessions.values()):
            await sess.close()

    async def _verdicts(self) -> None:
        """Pass each sidecar's ACK/NACK upstream; close sessions of departed sidecars."""
        while True:
            await asyncio.sleep(self.poll)
            if self.server is None:
                continue
            live = {c.node.id: c for c in list(self.server.connections.values())}
            for node_id, sess in list(self.sessions.items()):
                conn = live.get(node_id)
                if conn is None:
                    if node_id not in self.server.nodes:
                        await sess.close()
                        del self.sessions[node_id]
                        self._served_gen.pop(node_id, None)
                        for key in [k for k in self._seen_nacks if k[0] == node_id]:
                            del self._seen_nacks[key]
                    continue
                self._check(node_id, sess, conn)

    def _check(self, node_id: str, sess: UpstreamSession, conn: Any) -> None:
        if self._served_gen.get(node_id, -1) < sess.state.generation:
            return  # the server has not rebuilt this node from the latest upstream config yet
        refused = self.server.errors.get(node_id)
        snap = self.server.cache.get(node_id)
        for type_url, st in sess.state.types.items():
            if st.pending is None:
                continue
            if refused:
                sess.send(sess.state.verdict(type_url, f"l7fp relay refused the snapshot: {refused}"))
                continue
            ts = getattr(conn.state, "types", {}).get(type_url)
            nacks = int(getattr(ts, "nacks", 0) or 0)
            key = (node_id, type_url)
            if ts is not None and nacks > self._seen_nacks.get(key, 0):
                self._seen_nacks[key] = nacks
                sess.send(sess.state.verdict(type_url, str(ts.last_error or "NACK")))
            elif ts is None or not hasattr(ts, "acked_version"):
                sess.send(sess.state.verdict(type_url, None))  # delta stream or not subscribed
            elif snap is not None and ts.acked_version == snap.version(type_url) and not ts.pending:
                sess.send(sess.state.verdict(type_url, None))

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "upstream": f"{self.host}:{self.port}",
                "startup_probe": self.startup_probe,
                "sessions": [s.status() for s in self.sessions.values()], "at": time.time()}


def _name(msg: Any) -> str:
    from xds_server.resources import resource_name

    return resource_name(msg)


# -- l7fp serve plugin ------------------------------------------------------
def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Relay mode (docs/istio.md)")
    g.add_argument("--upstream-xds", metavar="HOST:PORT",
                   help="relay: take each sidecar's config from this upstream control plane "
                        "(istiod, usually istiod.istio-system.svc:15010) with the sidecar's own node, "
                        "split it, serve the residual; sidecar ACK/NACK goes upstream")


def make_sources(args: argparse.Namespace) -> list[Source]:
    target = getattr(args, "upstream_xds", None)
    if not target:
        return []
    from xds_server.bootstrap import parse_hostport

    try:
        host, port = parse_hostport(target)
    except ValueError:
        raise SystemExit(f"l7fp serve: --upstream-xds {target!r}: expected HOST:PORT "
                         "(e.g. istiod.istio-system.svc:15010)") from None
    return [RelaySource(host, port)]


def setup(server: Any, app: Any, args: argparse.Namespace) -> None:
    """Give the relay the server (verdicts) and add /debug/relayz to the admin API."""
    from aiohttp import web

    from xds_server import admin

    relays = [s for s in server.sources if isinstance(s, RelaySource)]
    for src in relays:
        src.server = server

    async def relayz(request: web.Request) -> web.Response:
        out = []
        for src in relays:
            st = src.status()
            for sess in st["sessions"]:
                plan = server.plans.get(sess["node"])
                sess["plan"] = repr(plan) if plan is not None else None
            out.append(st)
        return web.json_response(out)

    if relays:
        admin.add_route(app, "/debug/relayz", relayz)
        registry = getattr(getattr(server, "metrics", None), "registry", None)
        if registry is not None:
            registry.register(RelayCollector(relays))


class RelayCollector:
    """prometheus_client collector: upstream sessions of the relay, read at scrape time."""

    def __init__(self, relays: list[RelaySource]) -> None:
        self.relays = relays

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("l7fp_relay_upstream_connected",
                               "1 when the sidecar's upstream ADS stream is open", labels=["node"])
        connects = CounterMetricFamily("l7fp_relay_upstream_connects",
                                       "Upstream ADS streams opened per sidecar", labels=["node"])
        verdicts = CounterMetricFamily("l7fp_relay_verdicts", "Sidecar ACK/NACK passed upstream",
                                       labels=["node", "verdict"])
        reachable = GaugeMetricFamily("l7fp_relay_upstream_reachable",
                                      "1 when the startup TCP connect to the upstream succeeded",
                                      labels=["upstream"])
        for src in self.relays:
            if src.startup_probe is not None:
                reachable.add_metric([f"{src.host}:{src.port}"], float(src.startup_probe["ok"]))
            for node, sess in list(src.sessions.items()):
                up.add_metric([node], 1.0 if sess.connected else 0.0)
                connects.add_metric([node], sess.connects)
                for verdict, n in sess.verdicts.items():
                    verdicts.add_metric([node, verdict], n)
        yield from (up, connects, verdicts, reachable)

    def describe(self) -> list[Any]:
        return []
