"""A route timeout on Envoy's path, as the access-log receiver counts it
(fastpath.als.RouteTimeouts, NAME=odtimeout), over the wire bytes of the
entries Envoy 1.40 sends (seen with the binary:
tests/xds/test_als.py::test_timeouts_as_the_access_log_carries_them).

The attempt a route timeout resets has an upstream_log entry with no status
and no flag (as a downstream reset's); the request's HCM entry (the
UT-filtered logger) says `response_timeout`. A pair in the same message or
the next counts LOCAL_TIMEOUT for the attempt's host, once; anything else
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


def test_what_envoys_detector_does_not_count_is_not_counted() -> None:
    assert feed([attempt("r", 3)]) == []  # a downstream reset: no HCM entry (not UT)
    assert feed([attempt("r", 3)], [], [hcm("r", 3)]) == []  # not the same turn: forgotten
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


Entry = tuple[str, str, int, bool, bool]  # (kind, rid, host, route-timeout entry, flagged UT)
ENTRY = st.one_of(
    st.tuples(st.just("attempt"), st.sampled_from("rsq"), st.integers(3, 4), st.just(False),
              st.just(False)),
    st.tuples(st.just("hcm"), st.sampled_from("rsq"), st.integers(3, 4), st.booleans(), st.booleans()),
    st.tuples(st.just("answered"), st.sampled_from("rsq"), st.integers(3, 4), st.booleans(),
              st.booleans()))


def _model(messages: list[list[Entry]]) -> list[tuple[str, str, int]]:
    """What the receiver must count, as a scan over the history: an answered
    attempt (cluster `a`) its status or timeout; a route-timeout HCM entry
    the latest unanswered attempt of its request in its message (else in the
    message before) not already taken, LOCAL_TIMEOUT if on its host."""
    out: list[tuple[str, str, int]] = []
    seen: list[list[tuple[str, int, list[bool]]]] = []  # per message: (rid, host, [taken])
    for msg in messages:
        seen.append([])
        for kind, rid, host, rt, ut in msg:
            if kind == "answered":
                out.append(("a", f"198.18.0.{host}:80", LOCAL_TIMEOUT if ut else 200))
            elif kind == "attempt":
                seen[-1] = [x for x in seen[-1] if x[0] != rid] + [(rid, host, [False])]
            elif rt and ut:
                for pending in (seen[-1], seen[-2] if len(seen) > 1 else []):
                    mine = [x for x in pending if x[0] == rid and not x[2][0]]
                    if mine:
                        mine[-1][2][0] = True
                        if mine[-1][1] == host:
                            out.append(("od", f"198.18.0.{host}:80", LOCAL_TIMEOUT))
                        break
    return out


def _wire(e: Entry) -> HttpAccessLogEntry:
    kind, rid, host, rt, ut = e
    if kind == "answered":
        return attempt(rid, host, status=None if ut else 200, ut=ut, cluster="a")
    if kind == "attempt":
        return attempt(rid, host)
    return hcm(rid, host, details=ROUTE_TIMEOUT_DETAILS if rt else PER_TRY, ut=ut)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(ENTRY, max_size=6), max_size=6))
def test_pairs_in_any_order_and_batching(messages: list[list[Entry]]) -> None:
    """Random interleavings of unanswered attempts, answered ones (another
    cluster: counted as before, in order) and HCM entries of three requests
    on two hosts, in random flushes: the receiver counts as the model does."""
    assert feed(*[[_wire(e) for e in m] for m in messages]) == _model(messages)
