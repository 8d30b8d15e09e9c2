"""The grpclib ADS servicer: translates gRPC streams to the sans-I/O state machines.

Owned by xds_server.serve (and tests), which pass `AdsService(server)` and
`codec=PassthroughCodec()` to `grpclib.server.Server`. Each stream: the first
request must carry a node; then requests go to SotwStream/DeltaStream, cache
publishes wake the stream, and whatever the state machine returns is sent.
Bad requests are logged and ignored; they never end another stream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any as AnyT

import grpclib
import grpclib.const
import grpclib.server
from envoy_data_plane.envoy.service.discovery.v3 import (
    AggregatedDiscoveryServiceBase,
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from grpclib.encoding.proto import ProtoCodec

from xds_server.metrics import short_type
from xds_server.node import NodeInfo
from xds_server.protocol import requests
from xds_server.protocol.common import Ack, Event, Ignored, Nack, Outgoing
from xds_server.protocol.delta import DeltaStream
from xds_server.protocol.sotw import SotwStream
from xds_server.protocol.wire import Encoded
from xds_server.server import XdsServer
from xds_server.snapshot import Snapshot

log = logging.getLogger(__name__)
_ids = itertools.count(1)


class PassthroughCodec(ProtoCodec):
    """grpclib codec: sends pre-encoded responses (protocol.wire.Encoded) as they are,
    and decodes xDS requests with the fast top-level decoder (protocol.requests)."""

    def encode(self, message: AnyT, message_type: AnyT) -> bytes:
        if isinstance(message, Encoded):
            return message.data
        return super().encode(message, message_type)

    def decode(self, data: bytes, message_type: AnyT) -> AnyT:
        try:
            if message_type is DiscoveryRequest:
                return requests.decode_sotw(data)
            if message_type is DeltaDiscoveryRequest:
                return requests.decode_delta(data)
        except requests.DecodeError as exc:
            raise grpclib.GRPCError(grpclib.const.Status.INVALID_ARGUMENT, f"malformed request: {exc}") from None
        return super().decode(data, message_type)


@dataclass
class Connection:
    """One live ADS stream, as /debug/syncz and /debug/adsz show it."""

    id: int
    node: NodeInfo
    state: SotwStream | DeltaStream
    peer: str
    connected_at: float = field(default_factory=time.time)
    last_nack: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.state.kind


class AdsService(AggregatedDiscoveryServiceBase):
    """StreamAggregatedResources and DeltaAggregatedResources over one XdsServer."""

    def __init__(self, server: XdsServer) -> None:
        self.server = server
        self._children: dict[str, tuple[AnyT, AnyT]] = {}  # prometheus label children, by type

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        base = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
        return {
            base + "StreamAggregatedResources": grpclib.const.Handler(
                self._sotw, grpclib.const.Cardinality.STREAM_STREAM,
                DiscoveryRequest, DiscoveryResponse,
            ),
            base + "DeltaAggregatedResources": grpclib.const.Handler(
                self._delta, grpclib.const.Cardinality.STREAM_STREAM,
                DeltaDiscoveryRequest, DeltaDiscoveryResponse,
            ),
        }

    async def _sotw(self, stream: grpclib.server.Stream) -> None:
        await self._serve(stream, SotwStream())

    async def _delta(self, stream: grpclib.server.Stream) -> None:
        await self._serve(stream, DeltaStream())

    async def _serve(self, stream: grpclib.server.Stream, state: SotwStream | DeltaStream) -> None:
        first = await stream.recv_message()
        if first is None:
            return
        try:
            node = NodeInfo.from_proto(first.node)
        except ValueError as exc:
            log.warning("ADS stream refused: first request has no node (%s)", exc)
            raise grpclib.GRPCError(
                grpclib.const.Status.INVALID_ARGUMENT, "first request of an ADS stream must carry node.id"
            ) from None
        peer = _peer(stream)
        conn = Connection(next(_ids), node, state, peer)
        srv = self.server
        srv.connections[conn.id] = conn
        srv.metrics.connected.labels(state.kind).inc()
        log.info("ADS %s stream %d from %s: node %s", state.kind, conn.id, peer, node.id)
        wake = asyncio.Event()

        def on_snapshot(snap: Snapshot, born: float) -> None:
            state.set_snapshot(snap, born)
            wake.set()

        srv.stream_opened(node.id)
        srv.ensure_node(node)
        cancel = srv.cache.watch(node.id, on_snapshot)
        reader = asyncio.create_task(self._read(stream, conn, first, wake))
        try:
            await self._write(stream, conn, reader, wake)
        finally:
            reader.cancel()
            cancel()
            srv.connections.pop(conn.id, None)
            srv.metrics.connected.labels(state.kind).dec()
            srv.stream_closed(node.id)
            log.info("ADS stream %d (node %s) closed", conn.id, node.id)

    async def _read(self, stream: grpclib.server.Stream, conn: Connection, first: AnyT, wake: asyncio.Event) -> None:
        self._apply(conn, first)
        wake.set()
        async for req in stream:
            self._apply(conn, req)
            wake.set()

    async def _write(
        self, stream: grpclib.server.Stream, conn: Connection, reader: asyncio.Task[None], wake: asyncio.Event
    ) -> None:
        # The reader's end also sets `wake`, so one plain Event wait serves both
        # (no helper task per wake-up: that overhead showed at 1,000 streams).
        reader.add_done_callback(lambda _t: wake.set())
        while True:
            await wake.wait()
            if reader.done():
                reader.result()  # re-raise a read error (stream reset) to end the handler
                return
            wake.clear()
            for out in conn.state.responses():
                await stream.send_message(out.message)
                self._sent(conn, out)

    def _apply(self, conn: Connection, req: AnyT) -> None:
        try:
            events = conn.state.receive(req)
        except Exception:  # a malformed request must not kill the stream
            log.exception("node %s: request ignored, could not be processed", conn.node.id)
            self.server.metrics.ignored.labels("malformed").inc()
            return
        for ev in events:
            self._event(conn, ev)

    def _event(self, conn: Connection, ev: Event) -> None:
        m = self.server.metrics
        if isinstance(ev, Ack):
            if ev.born:
                m.convergence.labels(short_type(ev.type_url)).observe(max(0.0, time.monotonic() - ev.born))
        elif isinstance(ev, Nack):
            m.rejects.labels(short_type(ev.type_url)).inc()
            conn.last_nack[ev.type_url] = ev.error
            log.warning(
                "NACK from %s for %s version %s: %s", conn.node.id, short_type(ev.type_url), ev.version, ev.error
            )
        elif isinstance(ev, Ignored):
            reason = "stale_nonce" if ev.reason.startswith("stale") else "other"
            m.ignored.labels(reason).inc()
            level = logging.DEBUG if reason == "stale_nonce" else logging.WARNING
            log.log(level, "node %s: request for %r ignored: %s", conn.node.id, ev.type_url, ev.reason)

    def _sent(self, conn: Connection, out: Outgoing) -> None:
        t = short_type(out.type_url)
        pushes, size = self._children.get(t) or self._children.setdefault(
            t, (self.server.metrics.pushes.labels(t), self.server.metrics.config_size.labels(t)))
        pushes.inc()
        size.inc(len(out.message.data))
        log.debug("sent %s v%s nonce %s (%d resources, %d removed) to %s",
                  t, out.version, out.nonce, out.count, len(out.removed), conn.node.id)


def _peer(stream: grpclib.server.Stream) -> str:
    try:
        peer = stream.peer.addr()
        return f"{peer[0]}:{peer[1]}" if peer else "?"
    except Exception:  # noqa: BLE001 - informational only
        return "?"
