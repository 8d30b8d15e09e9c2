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

from typing import Any

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
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath.als import ROUTE_TIMEOUT_DETAILS, RouteTimeouts, observations
from fastpath.outlier import LOCAL_TIMEOUT

PER_TRY = "upstream_per_try_timeout"


def attempt(rid: str, host: int, status: int | None = None, ut: bool = False,
            cluster: str = "od", connected: bool = True,
            kind: AccessLogType = AccessLogType.UpstreamEnd) -> HttpAccessLogEntry:
    """The router's upstream_log entry of one attempt on 198.18.0.<host>:80
    (with the connection's local address unless its connect was pending)."""
    e = _entry(kind, rid, host, status, ut, "", cluster)
    if connected:
        e.common_properties.upstream_local_address = Address(
            socket_address=SocketAddress(address="198.18.0.9", port_value=40000))
    return e


def hcm(rid: str, host: int, details: str = ROUTE_TIMEOUT_DETAILS, ut: bool = True,
        status: int = 504, cluster: str = "od") -> HttpAccessLogEntry:
    """The HCM logger's entry of a request whose last attempt was on `host`."""
    return _entry(AccessLogType.DownstreamEnd, rid, host, status, ut, details, cluster)


def _entry(kind: AccessLogType, rid: str, host: int, status: int | None, ut: bool,
           details: str, cluster: str) -> HttpAccessLogEntry:
    common = AccessLogCommon(upstream_cluster=cluster, access_log_type=kind, upstream_remote_address=Address(
        socket_address=SocketAddress(address=f"198.18.0.{host}", port_value=80)))
    if ut:
        common.response_flags = ResponseFlags(upstream_request_timeout=True)
    return HttpAccessLogEntry(common_properties=common, request=HttpRequestProperties(request_id=rid),
                              response=HttpResponseProperties(response_code=status,
                                                              response_code_details=details))


def feed(*messages: list[HttpAccessLogEntry], timeouts: RouteTimeouts | None = None) -> list[Any]:
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
    assert feed([attempt("", 3), hcm("", 3)]) == []  # no request id: never paired
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
# what the detector counts). `h` is the last attempt's host, `o` another.
def _story(what: str, rid: str, h: int, o: int) -> tuple[list[HttpAccessLogEntry], list[Any]]:
    timeout, at_h = ("od", f"198.18.0.{h}:80", LOCAL_TIMEOUT), f"198.18.0.{h}:80"
    return {
        # the route timeout reset the connected attempt awaiting headers: counted, once
        "route_timeout": ([attempt(rid, h), hcm(rid, h)], [timeout]),
        # a retried request: the 503 of the first attempt counts, then the timeout
        "retried_timeout": ([attempt(rid, h), hcm(rid, h), attempt(rid, o, status=503)],
                            [timeout, ("od", f"198.18.0.{o}:80", 503)]),
        # the client went away: no HCM entry (not flagged UT), nothing counted
        "downstream_reset": ([attempt(rid, h)], []),
        # the attempt's connect still pending: no host for the detector yet
        "pending_connect": ([attempt(rid, h, connected=False), hcm(rid, h)], []),
        # fired in a retry's backoff: only the per-try timeout before it counts
        "in_backoff": ([attempt(rid, h, ut=True), hcm(rid, h)], [timeout]),
        # a per-try timeout ends the request: its attempt's flag counts it
        "per_try": ([attempt(rid, h, ut=True), hcm(rid, h, details=PER_TRY)], [timeout]),
        # after the upstream's headers: their status counts, the timeout not
        "after_headers": ([attempt(rid, h, status=200), hcm(rid, h, status=200)],
                          [("od", at_h, 200)]),
    }[what]


REQUEST = st.tuples(st.sampled_from(["route_timeout", "retried_timeout", "downstream_reset",
                                     "pending_connect", "in_backoff", "per_try", "after_headers"]),
                    st.sampled_from([(3, 4), (4, 3)]),  # (last attempt's host, another)
                    st.integers(0, 3),  # the message the request's first entry is in
                    st.integers(0, 1),  # flushes between its pair (Envoy: at most one)
                    st.booleans(),  # the HCM entry first
                    st.lists(st.floats(0, 1), min_size=3, max_size=3))  # places in a message


@settings(max_examples=200, deadline=None)
@given(st.lists(REQUEST, max_size=8))
def test_counts_what_envoys_detector_counts_whatever_the_order_and_flushes(
        requests: list[tuple[str, tuple[int, int], int, int, bool, list[float]]]) -> None:
    """Requests of known fate, their entries in random order and random flushes
    as Envoy may write them (a request's attempt entry and HCM entry in
    either order, at most one flush apart): the receiver counts, per host,
    what Envoy's detector counted for those requests."""
    messages: list[list[tuple[float, HttpAccessLogEntry]]] = [[] for _ in range(5)]
    want: list[Any] = []
    for n, (what, (h, o), first, gap, hcm_first, places) in enumerate(requests):
        entries, counted = _story(what, f"r{n}", h, o)
        want += counted
        at = [first, first + gap] if not hcm_first else [first + gap, first]
        for e, m, place in zip(entries, at + [first], places, strict=False):
            messages[m].append((place, e))
    got = feed(*[[e for _p, e in sorted(m, key=lambda x: x[0])] for m in messages])
    assert sorted(got) == sorted(want)
