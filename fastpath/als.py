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

import grpclib.const
import grpclib.server
from envoy_data_plane.envoy.service.accesslog.v3 import StreamAccessLogsResponse

from xds_server.protocol.requests import DecodeError, fields

log = logging.getLogger(__name__)

Observation = tuple[str, str, int]  # (cluster, "ip:port", response status)
Sink = Callable[[str, list[Observation]], None]
PATH = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"


class RawMessage:
    """grpclib request type that keeps the wire bytes: betterproto2 decodes a
    whole HttpAccessLogEntry in ~100 µs, too slow for one per request served
    by Envoy; `observations` reads only the four fields it needs."""

    @staticmethod
    def FromString(data: bytes) -> bytes:  # noqa: N802 - grpclib's codec calls this name
        return data


class AccessLogService:
    """grpclib servicer of envoy.service.accesslog.v3.AccessLogService."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.streams = 0
        self.entries = 0
        self.malformed = 0

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {PATH: grpclib.const.Handler(self._stream, grpclib.const.Cardinality.STREAM_UNARY,
                                            RawMessage, StreamAccessLogsResponse)}

    async def _stream(self, stream: grpclib.server.Stream) -> None:
        self.streams += 1
        node = ""
        async for data in stream:
            try:
                ident, obs = observations(data)
            except DecodeError as exc:
                self.malformed += 1
                log.warning("access log from %s: malformed message (%s)", node or "?", exc)
                continue
            node = ident or node
            self.entries += len(obs)
            if obs and node:
                try:
                    self.sink(node, obs)
                except Exception:  # one bad batch never ends the stream
                    log.exception("access log from %s", node)
        await stream.send_message(StreamAccessLogsResponse())


# field numbers (envoy/service/accesslog/v3/als.proto, envoy/data/accesslog/v3/accesslog.proto)
_IDENTIFIER, _HTTP_LOGS = 1, 2  # StreamAccessLogsMessage
_ID_NODE = _NODE_ID = 1  # Identifier.node, Node.id
_LOG_ENTRY = 1  # HTTPAccessLogEntries.log_entry
_COMMON, _RESPONSE = 1, 4  # HTTPAccessLogEntry
_UPSTREAM_ADDRESS, _UPSTREAM_CLUSTER = 13, 15  # AccessLogCommon
_SOCKET, _SA_ADDRESS, _SA_PORT = 1, 2, 3  # Address.socket_address, SocketAddress
_RESPONSE_CODE = 1  # HTTPResponseProperties.response_code (UInt32Value.value = 1)


def observations(data: bytes) -> tuple[str, list[Observation]]:
    """(node id or "", (cluster, host, status) of each HTTP entry with an
    upstream host and a status) of one StreamAccessLogsMessage; DecodeError
    if malformed."""
    node, out = "", []
    for num, v in fields(data):
        if num == _IDENTIFIER and isinstance(v, bytes):
            node = _str(_sub(_sub(v, _ID_NODE), _NODE_ID))
        elif num == _HTTP_LOGS and isinstance(v, bytes):
            for n, entry in fields(v):
                if n == _LOG_ENTRY and isinstance(entry, bytes):
                    obs = _observation(entry)
                    if obs is not None:
                        out.append(obs)
    return node, out


def _observation(entry: bytes) -> Observation | None:
    top = dict(fields(entry))
    common, resp = top.get(_COMMON, b""), top.get(_RESPONSE, b"")
    if not isinstance(common, bytes) or not isinstance(resp, bytes):
        return None
    cf = dict(fields(common))
    cluster = _str(cf.get(_UPSTREAM_CLUSTER, b""))
    sa = dict(fields(_sub(cf.get(_UPSTREAM_ADDRESS, b""), _SOCKET)))
    address, port = _str(sa.get(_SA_ADDRESS, b"")), sa.get(_SA_PORT, 0)
    code = _sub(resp, _RESPONSE_CODE)
    status = dict(fields(code)).get(1, 0) if code else 0
    if not cluster or not address or not isinstance(port, int) or not isinstance(status, int) \
            or not status:
        return None
    return cluster, f"{address}:{port}", status


def _sub(v: bytes | int, num: int) -> bytes:
    """The last length-delimited field `num` of message bytes `v` (b"": none)."""
    if not isinstance(v, bytes):
        return b""
    got = b""
    for n, x in fields(v):
        if n == num and isinstance(x, bytes):
            got = x
    return got


def _str(v: bytes | int) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else ""
