"""gRPC access log service (Envoy ALS): Envoy's responses for the kernel's outlier detectors.

Owned by fastpath.serve_plugin (`grpc_services`), served by `l7fp serve` on its
ADS port (the sidecars reach it through their bootstrap's xDS cluster, see
fastpath.residual_outlier). Each stream's first message names the node;
every HTTP entry with an upstream host becomes one observation
(cluster, "ip:port", status) handed to `sink(node_id, observations)` (the
agent: `Agent.envoy_observed`), on the server's loop. Entries without an
upstream host (Envoy's own "no healthy upstream", a route without cluster)
are not counted: Envoy's detector does not count them either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpclib.const
import grpclib.server
from envoy_data_plane.envoy.service.accesslog.v3 import (
    StreamAccessLogsMessage,
    StreamAccessLogsResponse,
)

log = logging.getLogger(__name__)

Observation = tuple[str, str, int]  # (cluster, "ip:port", response status)
Sink = Callable[[str, list[Observation]], None]
PATH = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"


class AccessLogService:
    """grpclib servicer of envoy.service.accesslog.v3.AccessLogService."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.streams = 0
        self.entries = 0

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {PATH: grpclib.const.Handler(self._stream, grpclib.const.Cardinality.STREAM_UNARY,
                                            StreamAccessLogsMessage, StreamAccessLogsResponse)}

    async def _stream(self, stream: grpclib.server.Stream) -> None:
        self.streams += 1
        node = ""
        async for msg in stream:
            ident = msg.identifier
            if ident is not None and ident.node is not None and ident.node.id:
                node = ident.node.id
            obs = observations(msg)
            self.entries += len(obs)
            if obs and node:
                try:
                    self.sink(node, obs)
                except Exception:  # one bad batch never ends the stream
                    log.exception("access log from %s", node)
        await stream.send_message(StreamAccessLogsResponse())


def observations(msg: StreamAccessLogsMessage) -> list[Observation]:
    """(cluster, host, status) of each HTTP entry that has an upstream host and a status."""
    http = msg.http_logs
    out: list[Observation] = []
    for e in (http.log_entry if http is not None else []):
        obs = _observation(e)
        if obs is not None:
            out.append(obs)
    return out


def _observation(e: Any) -> Observation | None:
    cp, resp = e.common_properties, e.response
    if cp is None or resp is None or not cp.upstream_cluster:
        return None
    sa = getattr(cp.upstream_remote_address, "socket_address", None)
    status = int(resp.response_code or 0)
    if sa is None or not sa.address or not status:
        return None
    return cp.upstream_cluster, f"{sa.address}:{sa.port_value}", status
