"""gRPC access log service (Envoy ALS): Envoy's responses for the kernel's outlier detectors.

Owned by fastpath.serve_plugin (`grpc_services`), served by `l7fp serve` on its
ADS port (the sidecars reach it through their bootstrap's xDS cluster, see
fastpath.residual_outlier). Each stream's first message names the node and
the log; a stream is accepted only with the log name the residual's logger
has (ALS_LOG_NAME) and from the IP its node id names (`sidecar~IP~...`):
anything that reaches the ADS port could otherwise count errors into, and
eject, any node's hosts. `on_stream(node_id, live)` says when a node's
first accepted stream opens and its last one ends (the agent owns Envoy's
detector only meanwhile). Every upstream attempt's entry (the router's
upstream_log) with an upstream host becomes one observation (cluster,
"ip:port", status; for an attempt without a status its local-origin event,
fastpath.outlier.LOCAL_*) handed to `sink(node_id, observations)` (the
agent: `Agent.envoy_observed`), on the server's loop. Entries without an
upstream host (Envoy's own "no healthy upstream", a route without cluster)
are not counted: Envoy's detector does not count them either. A route
timeout is one more observation (LOCAL_TIMEOUT) for the host of the attempt
it reset: the HCM's entry of the request (`RouteTimeouts`, paired with that
attempt's entry on the same stream).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable

import grpclib.const
import grpclib.exceptions
import grpclib.server
from envoy_data_plane.envoy.service.accesslog.v3 import StreamAccessLogsResponse

from fastpath.outlier import LOCAL_CONNECT_FAILED, LOCAL_RESET, LOCAL_TIMEOUT, LOCAL_TIMEOUT_ALT
from fastpath.residual_outlier import ALS_LOG_NAME, ALT_STATE, node_ip
from xds_server.protocol.requests import DecodeError, fields

log = logging.getLogger(__name__)

Observation = tuple[str, str, int]  # (cluster, "ip:port", status or outlier.LOCAL_*)
Sink = Callable[[str, list[Observation]], None]
OnStream = Callable[[str, bool], None]  # (node id, live)
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

    def __init__(self, sink: Sink, on_stream: OnStream | None = None) -> None:
        self.sink = sink
        self.on_stream = on_stream
        self.live: dict[str, int] = {}  # node id -> accepted streams open now
        self.streams = 0
        self.observations = 0
        self.malformed = 0
        self.refused = 0
        self._told: set[tuple[str, str]] = set()  # (node id, refusal) already logged

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {PATH: grpclib.const.Handler(self._stream, grpclib.const.Cardinality.STREAM_UNARY,
                                            RawMessage, StreamAccessLogsResponse)}

    async def _stream(self, stream: grpclib.server.Stream) -> None:
        self.streams += 1
        node, said, timeouts = "", False, RouteTimeouts()
        try:
            async for data in stream:
                try:
                    ident, log_name, obs = observations(data, timeouts)
                except DecodeError as exc:
                    said = self._malformed(node, exc, said)
                    continue
                if not node:
                    node = self._accept(ident, log_name, stream)
                    if not node:  # nothing of this stream is counted
                        raise grpclib.exceptions.GRPCError(grpclib.const.Status.PERMISSION_DENIED,
                                                           "l7fp: access log stream refused")
                self.observations += len(obs)
                if obs:
                    try:
                        self.sink(node, obs)
                    except Exception:  # one bad batch never ends the stream
                        log.exception("access log from %s", node)
            await stream.send_message(StreamAccessLogsResponse())
        finally:
            if node:
                self._gone(node)

    def _malformed(self, node: str, exc: DecodeError, said: bool) -> bool:
        """Count a message that does not decode (True: the stream has said so).
        Before the stream is accepted (its identifier unread) refuse it: a
        peer that never names itself must not hold it open. Logged once per
        stream, the rest only counted."""
        self.malformed += 1
        if not node:
            raise grpclib.exceptions.GRPCError(grpclib.const.Status.INVALID_ARGUMENT,
                                               f"l7fp: malformed access log message ({exc})")
        if not said:
            log.warning("access log from %s: malformed message (%s); more on this stream are "
                        "only counted", node, exc)
        return True

    def _accept(self, ident: str, log_name: str, stream: grpclib.server.Stream) -> str:
        """The node id of a stream's first message, or "" (logged) when refused."""
        peer = stream.peer.addr()
        why = refusal(ident, log_name, peer[0] if peer else "")
        if why:
            self.refused += 1
            # Envoy reopens a refused stream at every flush (10 ms, per worker):
            # one line per (node, reason), the counter counts them all
            if (ident, why) not in self._told and len(self._told) < 4096:
                self._told.add((ident, why))
                log.warning("access log stream refused (said once per node and reason): %s", why)
            return ""
        self.live[ident] = self.live.get(ident, 0) + 1
        if self.live[ident] == 1:
            self._tell(ident, True)
        return ident

    def _gone(self, node: str) -> None:
        self.live[node] -= 1
        if not self.live[node]:
            del self.live[node]
            self._tell(node, False)

    def _tell(self, node: str, live: bool) -> None:
        """on_stream, guarded: `live` already counts the stream, so a raise here
        must not skip the _gone that takes it back."""
        if self.on_stream is None:
            return
        try:
            self.on_stream(node, live)
        except Exception:  # the stream goes on; its count stays balanced
            log.exception("access log: on_stream(%s, %s)", node, live)


def refusal(node: str, log_name: str, peer_ip: str) -> str:
    """Why a stream identified as (`node`, `log_name`) from `peer_ip` is
    refused ("": accepted): another log than ALS_LOG_NAME, a node id without
    an IP (`sidecar~IP~...`), or a peer that is not that IP."""
    if log_name != ALS_LOG_NAME:
        return f"log name {log_name!r} is not {ALS_LOG_NAME!r} (node {node!r})"
    want = node_ip(node)
    if want is None:
        return f"node id {node!r} names no IP (sidecar~IP~...)"
    try:
        got = ipaddress.ip_address(peer_ip.split("%")[0])
    except ValueError:
        return f"node {node!r}: peer address {peer_ip!r} is not an IP"
    if isinstance(got, ipaddress.IPv6Address) and got.ipv4_mapped is not None:
        got = got.ipv4_mapped
    if got != want:
        return f"node {node!r} names {want}, its stream comes from {got}"
    return ""


# field numbers (envoy/service/accesslog/v3/als.proto, envoy/data/accesslog/v3/accesslog.proto)
_IDENTIFIER, _HTTP_LOGS = 1, 2  # StreamAccessLogsMessage
_ID_NODE = _NODE_ID = 1  # Identifier.node, Node.id
_ID_LOG_NAME = 2  # Identifier.log_name
_LOG_ENTRY = 1  # HTTPAccessLogEntries.log_entry
_COMMON, _RESPONSE = 1, 4  # HTTPAccessLogEntry
_UPSTREAM_ADDRESS, _UPSTREAM_CLUSTER, _RESPONSE_FLAGS = 13, 15, 16  # AccessLogCommon
_UPSTREAM_LOCAL = 14  # AccessLogCommon.upstream_local_address: set once connected
_DOWNSTREAM_PEER = 20  # AccessLogCommon.downstream_direct_remote_address (not from XFF)
_FILTER_STATE = 21  # AccessLogCommon.filter_state_objects (map entries: key 1, value 2)
# ResponseFlags of an attempt without a response -> its local-origin event
# (fastpath.outlier.LOCAL_*; the keeper maps it per cluster: without
# split_external_local_origin_errors a timeout is its 504, or the 204 of an
# honoured alt-response header (LOCAL_TIMEOUT_ALT, `_alt_response`), a connect
# failure or reset 503) (Envoy's router: a timeout is LocalOriginTimeout with its 504, any
# upstream reset but an overflow LocalOriginConnectFailed, which
# resultToHttpCode makes 503; a pool failure never had its LocalOriginConnectSuccess).
# A route timeout is not here: the attempt it resets has an entry with no status
# and no flag, as a downstream reset's; RouteTimeouts tells them apart.
_NO_RESPONSE = {3: LOCAL_TIMEOUT,  # upstream_request_timeout (per-try timeout)
                17: LOCAL_TIMEOUT,  # stream_idle_timeout (per_try_idle_timeout)
                6: LOCAL_CONNECT_FAILED,  # upstream_connection_failure
                5: LOCAL_RESET, 7: LOCAL_RESET,  # upstream_remote_reset, _connection_termination
                24: LOCAL_RESET}  # upstream_protocol_error
_SOCKET, _SA_ADDRESS, _SA_PORT = 1, 2, 3  # Address.socket_address, SocketAddress
_RESPONSE_CODE = 1  # HTTPResponseProperties.response_code (UInt32Value.value = 1)
_REQUEST, _REQUEST_ID = 3, 9  # HTTPAccessLogEntry.request, HTTPRequestProperties.request_id
_CODE_DETAILS = 6  # HTTPResponseProperties.response_code_details
_LOG_TYPE = 33  # AccessLogCommon.access_log_type
# AccessLogType: only an attempt's last entry counts (UpstreamEnd). The router's
# upstream_log_options (flush_upstream_log_on_upstream_stream,
# upstream_log_flush_interval: a user's router config passes them through) add
# UpstreamPoolReady and UpstreamPeriodic entries of the same attempt: never
# counted. NotSet: an Envoy that does not say the type (older than the field)
# gives every entry as an attempt's last, as the receiver read them before.
_NOT_SET, _DOWNSTREAM_END, _UPSTREAM_END = 0, 6, 9
_UT = 3  # ResponseFlags.upstream_request_timeout
# response_code_details of Envoy 1.40's route timeout (Filter::onResponseTimeout;
# a per-try timeout's is "upstream_per_try_timeout": its attempt's flag counts it)
ROUTE_TIMEOUT_DETAILS = "response_timeout"
# the router's timeout code with x-envoy-upstream-rq-timeout-alt-response (Envoy
# honours it on internal requests only; the HCM strips it from the others)
ALT_TIMEOUT_STATUS = 204


# The key both entries of one request's timed-out attempt carry (seen with
# Envoy 1.40, `RouteTimeouts`): (x-request-id or "", the downstream
# connection's peer "ip:port", the attempt's upstream connection "ip:port").
PairKey = tuple[str, str, str]
# (key, (cluster, "ip:port")) -> the codes of the entries kept (a route timeout's
# observation code; 0 for an attempt's)
_Kept = dict[tuple[PairKey, tuple[str, str]], list[int]]


class RouteTimeouts:
    """One access-log stream's attempts that ended with no status and no flag,
    and its route-timeout HCM entries, to tell a route timeout from a
    downstream reset (fastpath.als.observations; owned by
    AccessLogService._stream, one per stream).

    Envoy's detector counts a route timeout (Filter::onResponseTimeout:
    LocalOriginTimeout with its timeout code, 504 or the alt-response 204)
    for each attempt still awaiting headers,
    and nothing when it fires between attempts (a retry's backoff) or after
    the upstream's headers, or while the attempt's connection is pending (no
    host yet for the detector). The attempt's own entry has no status and no flag,
    as when the downstream resets the request; the request's entry from the
    HCM's logger (residual_outlier.timeout_logger: only requests flagged UT)
    says `response_timeout` and names the last attempt's host. Seen with
    Envoy 1.40: both come on the same stream (one logger per worker for
    both), the attempt's first; the worker writes them in one turn, so at
    most one flush falls between them. Both carry the request's x-request-id
    when it has one (none: `generate_request_id: false` and no header from
    the client), the downstream connection's peer address and the upstream
    connection's local address (the HCM's: its last attempt's); the
    `stream_id` of AccessLogCommon is no other key: the HCM's entry has the
    x-request-id there, the attempts' none. So they pair by that PairKey:
    without an x-request-id the two connections tell the request (an
    HTTP/1.1 connection carries one request at a time).
    The pairing does not rely on the order: whichever of the two comes
    first is kept by its key for its message and the next, and the other
    one pairs with it. A route timeout counts for its host only when an
    unanswered attempt on that host, connected (its entry
    has an upstream local address; a pending one has the host but none), is
    paired with it: once, never for an attempt that got headers or a flag
    (those counted already). What is not paired within a flush (a
    downstream reset's attempt) is forgotten."""

    def __init__(self) -> None:
        self._attempts: tuple[_Kept, _Kept] = ({}, {})  # (this message's, the one before's)
        self._timeouts: tuple[_Kept, _Kept] = ({}, {})

    def next_message(self) -> None:
        """A new message of the stream begins: forget the one before the last."""
        self._attempts = ({}, self._attempts[0])
        self._timeouts = ({}, self._timeouts[0])

    def unanswered(self, key: PairKey, cluster: str, host: str) -> int:
        """A connected attempt with `key` on (`cluster`, `host`) ended with no
        status and no flag: the code of the request's route timeout (count it)
        when that timeout, already seen, reset it, at most once; else 0."""
        return _pair((key, (cluster, host)), 0, self._timeouts, self._attempts)

    def timed_out(self, key: PairKey, cluster: str, host: str, code: int) -> int:
        """The route timeout (observation `code`) of the request with `key`,
        last attempt on (`cluster`, `host`): `code` (count it) when that
        attempt, already seen, was reset by it, at most once; else 0."""
        return _pair((key, (cluster, host)), code, self._attempts, self._timeouts)


def _pair(entry: tuple[PairKey, tuple[str, str]], code: int, other: tuple[_Kept, _Kept],
          mine: tuple[_Kept, _Kept]) -> int:
    """RouteTimeouts' rule, one side: pair with an entry of the other side
    kept from this message or the one before (taken: once) and give the
    route timeout's code (`code`, or the kept one's); none kept: keep this
    one for the other side and give 0. A key may hold several entries: two
    requests multiplexed on the same two connections without an x-request-id."""
    for kept in other:
        codes = kept.get(entry)
        if codes:
            got = codes.pop(0)
            if not codes:
                del kept[entry]
            return code or got
    mine[0].setdefault(entry, []).append(code)
    return 0


def observations(data: bytes, timeouts: RouteTimeouts | None = None
                 ) -> tuple[str, str, list[Observation]]:
    """(node id or "", log name or "", (cluster, host, status or LOCAL_*) of
    each HTTP entry with an upstream host and a status or a local-origin
    event) of one StreamAccessLogsMessage
    (the identifier is in a stream's first message only); DecodeError if
    malformed. With `timeouts` (the stream's) a route timeout is paired with
    the attempt it reset (LOCAL_TIMEOUT for its host); without, never counted."""
    node, name, out = "", "", []
    if timeouts is not None:
        timeouts.next_message()
    for num, v in fields(data):
        if num == _IDENTIFIER and isinstance(v, bytes):
            node = _str(_sub(_sub(v, _ID_NODE), _NODE_ID))
            name = _str(_sub(v, _ID_LOG_NAME))
        elif num == _HTTP_LOGS and isinstance(v, bytes):
            for n, entry in fields(v):
                if n == _LOG_ENTRY and isinstance(entry, bytes):
                    obs = _observation(entry, timeouts)
                    if obs is not None:
                        out.append(obs)
    return node, name, out


def _observation(entry: bytes, timeouts: RouteTimeouts | None) -> Observation | None:
    top = dict(fields(entry))
    common, resp = top.get(_COMMON, b""), top.get(_RESPONSE, b"")
    if not isinstance(common, bytes) or not isinstance(resp, bytes):
        return None
    cf = dict(fields(common))
    at = _upstream(cf)
    kind = cf.get(_LOG_TYPE, _NOT_SET)
    if kind == _DOWNSTREAM_END:  # the HCM's logger: a route timeout or nothing
        return _route_timeout(top, cf, resp, at, timeouts)
    if kind not in (_UPSTREAM_END, _NOT_SET):  # an attempt's pool-ready or periodic entry
        return None
    status = _status(resp)
    flags = _flags(cf)
    if not status:
        status = _no_response_status(flags)
        if status == LOCAL_TIMEOUT and _alt_response(common):  # its code was 204
            status = LOCAL_TIMEOUT_ALT
        if not status and at is not None and timeouts is not None and not flags \
                and cf.get(_UPSTREAM_LOCAL):  # connected: not a pending connect
            status = timeouts.unanswered(_pair_key(top, cf), *at)
    if at is None or not status:
        return None
    return at[0], at[1], status


def _upstream(cf: dict[int, bytes | int]) -> tuple[str, str] | None:
    """(cluster, "ip:port") of an entry's AccessLogCommon fields, None: no upstream host."""
    cluster = _str(cf.get(_UPSTREAM_CLUSTER, b""))
    address, port = _ip_port(cf.get(_UPSTREAM_ADDRESS, b"")) or ("", 0)
    # port 0: a named_port (or no port), which names no upstream host
    if not cluster or not address or not port:
        return None
    return cluster, f"{address}:{port}"


def _route_timeout(top: dict[int, bytes | int], cf: dict[int, bytes | int], resp: bytes,
                   at: tuple[str, str] | None, timeouts: RouteTimeouts | None) -> Observation | None:
    """The observation of a downstream (HCM) entry: for the host of the attempt
    a route timeout reset (RouteTimeouts), LOCAL_TIMEOUT, or LOCAL_TIMEOUT_ALT
    when Envoy answered the alt-response 204 (its detector counted that code);
    else None."""
    if at is None or timeouts is None or _str(_sub(resp, _CODE_DETAILS)) != ROUTE_TIMEOUT_DETAILS:
        return None
    if _UT not in _flags(cf):
        return None
    code = LOCAL_TIMEOUT_ALT if _status(resp) == ALT_TIMEOUT_STATUS else LOCAL_TIMEOUT
    if not timeouts.timed_out(_pair_key(top, cf), *at, code):
        return None
    return at[0], at[1], code


def _alt_response(common: bytes) -> bool:
    """The entry's AccessLogCommon (bytes) logs the filter state ALT_STATE: its
    request had x-envoy-upstream-rq-timeout-alt-response where Envoy honours
    it (residual_outlier.alt_state_filter), so the router's timeout code,
    which its detector counted for each timeout of the request, was 204."""
    return any(num == _FILTER_STATE and isinstance(v, bytes) and _str(_sub(v, 1)) == ALT_STATE
               for num, v in fields(common))


def _pair_key(top: dict[int, bytes | int], cf: dict[int, bytes | int]) -> PairKey:
    """An entry's PairKey: (x-request-id, downstream peer, upstream local address)."""
    return (_str(_sub(top.get(_REQUEST, b""), _REQUEST_ID)), _address(cf.get(_DOWNSTREAM_PEER, b"")),
            _address(cf.get(_UPSTREAM_LOCAL, b"")))


def _address(v: bytes | int) -> str:
    """"ip:port" of an Address message's bytes ("" when it has no socket address)."""
    ip_port = _ip_port(v)
    return f"{ip_port[0]}:{ip_port[1]}" if ip_port else ""


def _ip_port(v: bytes | int) -> tuple[str, int] | None:
    """(ip, port) of an Address message's bytes (a port that is no number: 0);
    None when it has no socket address."""
    sa = dict(fields(_sub(v, _SOCKET)))
    if not sa:
        return None
    port = sa.get(_SA_PORT, 0)
    return _str(sa.get(_SA_ADDRESS, b"")), port if isinstance(port, int) else 0


def _status(resp: bytes) -> int:
    """HTTPResponseProperties.response_code of an entry (0: none)."""
    code = _sub(resp, _RESPONSE_CODE)
    status = dict(fields(code)).get(1, 0) if code else 0
    return status if isinstance(status, int) else 0


def _flags(cf: dict[int, bytes | int]) -> set[int]:
    """The ResponseFlags fields set (their numbers) of an entry's AccessLogCommon fields."""
    flags = cf.get(_RESPONSE_FLAGS, b"")
    return {n for n, v in fields(flags) if v} if isinstance(flags, bytes) else set()


def _no_response_status(flags: set[int]) -> int:
    """The local-origin event (outlier.LOCAL_*) of an attempt that got no
    response (its ResponseFlags set, `_flags`), 0: none Envoy's detector
    counts (the lowest field wins, as when the wire was read in order)."""
    return next((_NO_RESPONSE[n] for n in sorted(flags) if n in _NO_RESPONSE), 0)


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
