"""A route timeout on Envoy's path, as the access-log receiver counts it
(fastpath.als.RouteTimeouts, NAME=odtimeout), over the wire bytes of the
entries Envoy 1.40 sends (seen with the binary:
tests/xds/test_als.py::test_timeouts_as_the_access_log_carries_them).

The attempt a route timeout resets has an upstream_log entry with no status
and no flag (as a downstream reset's); the request's HCM entry (the
UT-filtered logger) says `response_timeout`. A pair in the same message or
the next, in either order, counts LOCAL_TIMEOUT for the attempt's host, once; anything else
the HCM logger sends counts nothing, and attempts count as before.
"""

from __future__ import annotations

from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress
from envoy_data_plane.envoy.data.accesslog.v3 import (
    AccessLogCommon,
    AccessLogType,
    HttpAccessLogEntry,
    HttpRequestProperties,
    HttpResponseProperties,
    ResponseFlags,
)
from envoy_data_plane.envoy.service.accesslog.v3 import (
    StreamAccessLogsMessage,
    StreamAccessLogsMessageHttpAccessLogEntries,
)
from envoy_data_plane.google.protobuf import Any
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath.als import ROUTE_TIMEOUT_DETAILS, RouteTimeouts, observations
from fastpath.outlier import LOCAL_TIMEOUT, LOCAL_TIMEOUT_ALT
from fastpath.residual_outlier import ALT_STATE

PER_TRY = "upstream_per_try_timeout"


def attempt(rid: str, host: int, status: int | None = None, ut: bool = False,
            cluster: str = "od", connected: bool = True,
            kind: AccessLogType = AccessLogType.UpstreamEnd, peer: int = 30000,
            conn: int = 40000, alt: bool = False) -> HttpAccessLogEntry:
    """The router's upstream_log entry of one attempt on 198.18.0.<host>:80 of a
    request from the downstream peer 198.18.0.8:`peer`, on the upstream
    connection from 198.18.0.9:`conn` (none: its connect was pending); with
    `alt` the request had x-envoy-upstream-rq-timeout-alt-response, honoured
    (the filter state residual_outlier.alt_state_filter sets)."""
    return _entry(kind, rid, host, status, ut, "", cluster, peer, conn if connected else 0, alt)


def hcm(rid: str, host: int, details: str = ROUTE_TIMEOUT_DETAILS, ut: bool = True,
        status: int = 504, cluster: str = "od", peer: int = 30000,
        conn: int = 40000, alt: bool = False) -> HttpAccessLogEntry:
    """The HCM logger's entry of a request whose last attempt was on `host`
    over the upstream connection from port `conn` (0: none, pending)."""
    return _entry(AccessLogType.DownstreamEnd, rid, host, status, ut, details, cluster, peer, conn, alt)


def _entry(kind: AccessLogType, rid: str, host: int, status: int | None, ut: bool,
           details: str, cluster: str, peer: int, conn: int, alt: bool) -> HttpAccessLogEntry:
    """As Envoy 1.40 fills them: the downstream peer on both, x-request-id
    in request.request_id (AccessLogCommon.stream_id only on the HCM's entry,
    equal to it: not read)."""
    common = AccessLogCommon(upstream_cluster=cluster, access_log_type=kind, upstream_remote_address=Address(
        socket_address=SocketAddress(address=f"198.18.0.{host}", port_value=80)),
        downstream_direct_remote_address=Address(socket_address=SocketAddress(
            address="198.18.0.8", port_value=peer)),
        stream_id=rid if kind == AccessLogType.DownstreamEnd else "")
    if alt:  # as Envoy 1.40 logs it: the header's value as a StringValue
        common.filter_state_objects = {ALT_STATE: Any(
            type_url="type.googleapis.com/google.protobuf.StringValue", value=b"\n\x011")}
    if conn:
        common.upstream_local_address = Address(
            socket_address=SocketAddress(address="198.18.0.9", port_value=conn))
    if ut:
        common.response_flags = ResponseFlags(upstream_request_timeout=True)
    return HttpAccessLogEntry(common_properties=common, request=HttpRequestProperties(request_id=rid),
                              response=HttpResponseProperties(response_code=status,
                                                              response_code_details=details))


def feed(*messages: list[HttpAccessLogEntry], timeouts: RouteTimeouts | None = None) -> list[object]:
    """The observations of `messages`, one stream in order."""
    t = RouteTimeouts() if timeouts is None else timeouts
    out = []
    for m in messages:
        data = bytes(StreamAccessLogsMessage(http_logs=StreamAccessLogsMessageHttpAccessLogEntries(
            log_entry=m)))
        out += observations(data, t)[2]
    return out


TIMEOUT_ON_3 = ("od", "198.18.0.3:80", LOCAL_TIMEOUT)


def test_a_route_timeout_counts_for_the_attempt_it_reset_once() -> None:
    assert feed([attempt("r", 3), hcm("r", 3)]) == [TIMEOUT_ON_3]
    assert feed([attempt("r", 3)], [hcm("r", 3)]) == [TIMEOUT_ON_3]  # a flush between them
    assert feed([attempt("r", 3), hcm("r", 3), hcm("r", 3)]) == [TIMEOUT_ON_3]  # once
    # the HCM entry first (Envoy 1.40 writes the attempt's first; nothing relies on it)
    assert feed([hcm("r", 3), attempt("r", 3)]) == [TIMEOUT_ON_3]
    assert feed([hcm("r", 3)], [attempt("r", 3)]) == [TIMEOUT_ON_3]
    assert feed([hcm("r", 3), attempt("r", 3), attempt("r", 3)]) == [TIMEOUT_ON_3]  # once


def test_what_envoys_detector_does_not_count_is_not_counted() -> None:
    assert feed([attempt("r", 3)]) == []  # a downstream reset: no HCM entry (not UT)
    assert feed([attempt("r", 3)], [], [hcm("r", 3)]) == []  # not the same turn: forgotten
    assert feed([hcm("r", 3)], [], [attempt("r", 3)]) == []
    assert feed([hcm("r", 4), attempt("r", 3)]) == []  # another host than the attempt's
    assert feed([attempt("r", 3), hcm("r", 4)]) == []  # another host than the attempt's
    assert feed([attempt("r", 3), hcm("q", 3)]) == []  # another request
    assert feed([attempt("r", 3, cluster="x"), hcm("r", 3)]) == []  # another cluster
    # no x-request-id: the same request's connections pair them; another's never
    assert feed([attempt("r", 3), hcm("r", 3, peer=30001)]) == []  # another downstream
    assert feed([attempt("", 3), hcm("", 3, conn=40001)]) == []  # another upstream connection
    assert feed([attempt("", 3, peer=30001), hcm("", 3)]) == []
    assert feed([attempt("", 3, connected=False), hcm("", 3, conn=0)]) == []
    # the connection still pending (no local address): Envoy's detector has no host yet
    assert feed([attempt("r", 3, connected=False), hcm("r", 3)]) == []
    # the route timeout in a retry's backoff: the per-try timeout before it counts, once
    assert feed([attempt("r", 3, ut=True), hcm("r", 3)]) == [TIMEOUT_ON_3]
    # after the upstream's headers: their status counts, the timeout not
    assert feed([attempt("r", 3, status=200), hcm("r", 3, status=200)]) == [
        ("od", "198.18.0.3:80", 200)]
    # the per-try timeout's own HCM entry (also flagged UT): counted by its attempt
    assert feed([attempt("r", 3, ut=True), hcm("r", 3, details=PER_TRY)]) == [TIMEOUT_ON_3]
    assert feed([attempt("r", 3), hcm("r", 3, ut=False)]) == []
    assert feed([attempt("r", 3), hcm("r", 3, details=PER_TRY)]) == []


TIMEOUT_204_ON_3 = ("od", "198.18.0.3:80", LOCAL_TIMEOUT_ALT)


def test_without_a_request_id_the_connections_pair_them() -> None:
    """`generate_request_id: false` and no x-request-id from the client: both
    entries have none (stream_id neither); the downstream peer and the
    upstream connection tell the request, in either order, once."""
    assert feed([attempt("", 3), hcm("", 3)]) == [TIMEOUT_ON_3]
    assert feed([hcm("", 3)], [attempt("", 3)]) == [TIMEOUT_ON_3]
    assert feed([attempt("", 3), hcm("", 3), hcm("", 3)]) == [TIMEOUT_ON_3]
    # two clients' requests on their own connections: each pairs with its own
    assert feed([attempt("", 3, peer=1, conn=41), attempt("", 3, peer=2, conn=42),
                 hcm("", 3, peer=2, conn=42)]) == [TIMEOUT_ON_3]
    # two requests multiplexed on the same connections, both timed out: two
    assert feed([attempt("", 3), attempt("", 3), hcm("", 3), hcm("", 3)]) == [TIMEOUT_ON_3] * 2


def test_the_alt_response_timeout_counts_as_envoys_204() -> None:
    """x-envoy-upstream-rq-timeout-alt-response (honoured: an internal request):
    the route timeout's code is 204, which Envoy's detector counts (without
    split a success; with split a local-origin timeout): LOCAL_TIMEOUT_ALT,
    whichever entry comes first."""
    assert feed([attempt("r", 3), hcm("r", 3, status=204)]) == [TIMEOUT_204_ON_3]
    assert feed([hcm("r", 3, status=204)], [attempt("r", 3)]) == [TIMEOUT_204_ON_3]
    assert feed([hcm("", 3, status=204), attempt("", 3)]) == [TIMEOUT_204_ON_3]
    # a per-try (or per-try idle) timeout's code: the filter state on its entry
    assert feed([attempt("r", 3, ut=True, alt=True)]) == [TIMEOUT_204_ON_3]
    assert feed([attempt("r", 3, ut=True, alt=True), hcm("r", 3, status=204, alt=True)]) == [
        TIMEOUT_204_ON_3]  # in a retry's backoff: the per-try timeout's only
    assert feed([attempt("r", 3, status=503, alt=True)]) == [("od", "198.18.0.3:80", 503)]


def test_an_hcm_entry_is_never_counted_as_a_status() -> None:
    """A downstream entry's status is Envoy's answer to the client (a local
    reply, the last attempt's): what the detector counted came per attempt."""
    assert feed([hcm("r", 3, status=503, details="via_upstream", ut=False)]) == []
    data = bytes(StreamAccessLogsMessage(http_logs=StreamAccessLogsMessageHttpAccessLogEntries(
        log_entry=[attempt("r", 3), hcm("r", 3)])))
    assert observations(data)[2] == []  # no stream state given: no pairing


def test_only_an_attempts_last_entry_counts() -> None:
    """The router's upstream_log_options (flush_upstream_log_on_upstream_stream,
    upstream_log_flush_interval; a user's router config passes them through)
    add an UpstreamPoolReady entry (connected, no status, no flag) and
    UpstreamPeriodic ones (a status once the headers came) per attempt: the
    pool-ready one paired with a route timeout Envoy did not count, a periodic
    one's status was counted as one more response."""
    ready, periodic = AccessLogType.UpstreamPoolReady, AccessLogType.UpstreamPeriodic
    # the route timeout fired after the headers: Envoy counted the 200 only
    assert feed([attempt("r", 3, kind=ready), attempt("r", 3, kind=periodic, status=200),
                 attempt("r", 3, status=200), hcm("r", 3, status=200)]) == [("od", "198.18.0.3:80", 200)]
    assert feed([attempt("r", 3, kind=periodic, status=503)]) == []
    assert feed([attempt("r", 3, kind=ready), hcm("r", 3)]) == []
    # ... and with its last entry, the route timeout that reset it counts, once
    assert feed([attempt("r", 3, kind=ready), attempt("r", 3), hcm("r", 3)]) == [TIMEOUT_ON_3]


def test_an_entry_without_its_type_is_an_attempts_last() -> None:
    """An Envoy that does not set access_log_type (older than the field): every
    entry without it is read as an attempt's last, as before the type was read."""
    unset = AccessLogType.NotSet
    assert feed([attempt("r", 3, kind=unset, status=503)]) == [("od", "198.18.0.3:80", 503)]
    assert feed([attempt("r", 3, kind=unset), hcm("r", 3)]) == [TIMEOUT_ON_3]


# What happened to one request, as Envoy's detector sees it -> (its entries: the
# pair the route timeout's rule is about first, then the attempts before it;
# what the detector counts). `h` is the last attempt's host, `o` another; the
# request came from downstream port `peer`, its last attempt went over the
# upstream connection from port `conn`, an attempt before over `conn + 1`
# (Envoy 1.40: the HCM's entry names its last attempt's; x-request-id `rid`,
# "" for none, on both).
def _story(what: str, rid: str, h: int, o: int, peer: int,
           conn: int) -> tuple[list[HttpAccessLogEntry], list[object]]:
    timeout, at_h = ("od", f"198.18.0.{h}:80", LOCAL_TIMEOUT), f"198.18.0.{h}:80"

    def a(host: int, **kw: object) -> HttpAccessLogEntry:
        return attempt(rid, host, peer=peer, **{"conn": conn, **kw})

    def d(**kw: object) -> HttpAccessLogEntry:
        return hcm(rid, h, peer=peer, **{"conn": conn, **kw})
    return {
        # the route timeout reset the connected attempt awaiting headers: counted, once
        "route_timeout": ([a(h), d()], [timeout]),
        # the same with x-envoy-upstream-rq-timeout-alt-response honoured: the
        # router's timeout code, 204, is what the detector gets (for each
        # timeout of the request); both entries carry the filter state
        "alt_timeout": ([a(h, alt=True), d(status=204, alt=True)], [("od", at_h, LOCAL_TIMEOUT_ALT)]),
        "alt_per_try": ([a(h, ut=True, alt=True), d(details=PER_TRY, status=204, alt=True)],
                        [("od", at_h, LOCAL_TIMEOUT_ALT)]),
        "alt_in_backoff": ([a(h, ut=True, alt=True), d(status=204, alt=True)],
                           [("od", at_h, LOCAL_TIMEOUT_ALT)]),
        # a retried request: the 503 of the first attempt counts, then the timeout
        "retried_timeout": ([a(h), d(), a(o, status=503, conn=conn + 1)],
                            [timeout, ("od", f"198.18.0.{o}:80", 503)]),
        # the client went away: no HCM entry (not flagged UT), nothing counted
        "downstream_reset": ([a(h)], []),
        # the attempt's connect still pending: no host for the detector yet
        "pending_connect": ([a(h, connected=False), d(conn=0)], []),
        # fired in a retry's backoff: only the per-try timeout before it counts
        "in_backoff": ([a(h, ut=True), d()], [timeout]),
        # a per-try timeout ends the request: its attempt's flag counts it
        "per_try": ([a(h, ut=True), d(details=PER_TRY)], [timeout]),
        # after the upstream's headers: their status counts, the timeout not
        "after_headers": ([a(h, status=200), d(status=200)], [("od", at_h, 200)]),
    }[what]


REQUEST = st.tuples(st.sampled_from(["route_timeout", "alt_timeout", "alt_per_try", "alt_in_backoff",
                                     "retried_timeout",
                                     "downstream_reset", "pending_connect", "in_backoff",
                                     "per_try", "after_headers"]),
                    st.sampled_from([(3, 4), (4, 3)]),  # (last attempt's host, another)
                    st.booleans(),  # with an x-request-id
                    st.integers(0, 3),  # the message the request's first entry is in
                    st.integers(0, 1),  # flushes between its pair (Envoy: at most one)
                    st.booleans(),  # the HCM entry first
                    st.lists(st.floats(0, 1), min_size=3, max_size=3))  # places in a message


@settings(max_examples=300, deadline=None)
@given(st.lists(REQUEST, max_size=8))
def test_counts_what_envoys_detector_counts_whatever_the_order_and_flushes(
        requests: list[tuple[str, tuple[int, int], bool, int, int, bool, list[float]]]) -> None:
    """Requests of known fate, their entries in random order and random flushes
    as Envoy may write them (a request's attempt entry and HCM entry in
    either order, at most one flush apart), with or without an x-request-id,
    each over its own connections (HTTP/1.1: one request at a time on each):
    the receiver counts, per host, what Envoy's detector counted for those
    requests."""
    messages: list[list[tuple[float, HttpAccessLogEntry]]] = [[] for _ in range(5)]
    want: list[object] = []
    for n, (what, (h, o), has_id, first, gap, hcm_first, places) in enumerate(requests):
        entries, counted = _story(what, f"r{n}" if has_id else "", h, o, 30000 + n, 40000 + 2 * n)
        want += counted
        at = [first, first + gap] if not hcm_first else [first + gap, first]
        for e, m, place in zip(entries, at + [first], places, strict=False):
            messages[m].append((place, e))
    got = feed(*[[e for _p, e in sorted(m, key=lambda x: x[0])] for m in messages])
    assert sorted(got) == sorted(want)
