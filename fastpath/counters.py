"""Fast-path counters and the kernel access log, in Prometheus and JSON form.

Owner: K2. The data path counts per (route, outcome, reason) in the per-CPU
map dp_stats and sends one event per decided request to the ring buffer
dp_events (datapath.h). `fastpath.agent` reads both; this module turns them
into `l7fp_fastpath_requests_total{route,outcome,reason}` (a prometheus_client
collector registered in the control plane's registry) and into access-log
entries with Envoy's access-log field names.
"""

from __future__ import annotations

import ctypes as ct
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily

OUTCOMES = {0: "fast", 1: "kernel_reply", 2: "envoy", 3: "cork", 4: "retry",
            5: "shadow_lost"}  # dp_mirror.h: a mirror's copy not posted (not a request)

# datapath.h DP_R_*
DP_REASONS = {0: "", 1: "sticky", 2: "pool_empty", 3: "untracked", 4: "upstream_gone",
              5: "too_many_upstreams", 6: "rewrite_failed", 7: "split_head", 8: "body_sync",
              9: "no_plan", 10: "pipelined", 11: "header_add", 12: "retry_copy",
              13: "retry_unpaired", 14: "retry_overflow", 15: "retry_lost", 16: "swallow_failed",
              17: "trace_header",  # dp_xrid.h on a tracing listener
              18: "conn_close", 19: "hop_header",  # dp_hop.h
              20: "delay_body", 21: "delayed", 22: "delay_inbound",  # dp_delay.h
              23: "path_rewrite",  # dp_rewrite.h
              26: "redirect_head", 27: "redirected",  # dp_redir.h
              24: "envoy_pending", 25: "envoy_untracked",  # dp_return.h
              28: "mirror_copy", 29: "mirror_dropped", 30: "mirror_inbound",  # dp_mirror.h
              31: "trace_sampled"}  # dp_xrid.h: Zipkin listener, Envoy reports the span
DECIDE_BASE = 32
# l7fp_defs.h L7FP_R_* (K1), counted as DECIDE_BASE + code. L7FP_R_POOL_EMPTY is set by
# the data path's adapter when the endpoint has no pool at all (dp_eps): "no_pool", not
# to be confused with DP_R_POOL_EMPTY (its pool ran dry).
DECIDE_REASONS = {0: "", 1: "unparsed", 2: "chunked", 3: "upgrade", 4: "http10", 5: "h2",
                  6: "too_large", 7: "punt_route", 8: "no_pool", 9: "expect", 10: "bad_cl",
                  11: "no_listener", 12: "no_vhost", 13: "no_route", 14: "no_host",
                  15: "no_endpoint", 16: "header_conflict", 17: "path_normalization",
                  18: "method", 19: "limit"}

DP_EV_CLOSE = 1
DP_R_POOL_EMPTY = 2
DP_EV_ACCESS = 2
DP_EV_RETRY = 3  # dp_retry.h: a response diverted for a retry
DP_EV_DELAY = 5  # dp_delay.h: a request held for a fault delay
DP_EV_DELAY_REPLY = 7  # dp_delay.h: a fault abort's reply held for the delay
DP_EV_REDIRECT = 8  # dp_redir.h: a redirect route's request head


def reason_name(code: int) -> str:
    if code >= DECIDE_BASE:
        return DECIDE_REASONS.get(code - DECIDE_BASE, f"decide_{code - DECIDE_BASE}")
    return DP_REASONS.get(code, f"dp_{code}")


def read_stats(bpf: Any) -> dict[tuple[int, str, str], int]:
    """(route id, outcome, reason) -> count, summed over CPUs."""
    out: dict[tuple[int, str, str], int] = {}
    for k, v in bpf["dp_stats"].items():
        key = (int(k.route), OUTCOMES.get(int(k.outcome), str(k.outcome)), reason_name(k.reason))
        out[key] = out.get(key, 0) + sum(int(x) for x in v)
    return out


class DpEvent(ct.Structure):
    """Mirror of struct dp_event (datapath.h); checked by tests/kernel_datapath/test_layout.py."""

    _fields_ = [("kind", ct.c_uint32), ("route", ct.c_uint32), ("cookie", ct.c_uint64),
                ("ts_ns", ct.c_uint64), ("outcome", ct.c_uint32), ("reason", ct.c_uint32),
                ("status", ct.c_uint32), ("bytes", ct.c_uint32), ("pool", ct.c_uint32),
                ("dst_ip", ct.c_uint32), ("dst_port", ct.c_uint32), ("_pad", ct.c_uint32),
                ("up_cookies", ct.c_uint64 * 4)]


class AccessLog:
    """The last `size` kernel-decided requests, as Envoy access-log JSON fields."""

    def __init__(self, size: int = 1000) -> None:
        self.entries: deque[dict[str, Any]] = deque(maxlen=size)
        self.boot_offset = time.time() - time.monotonic()

    def add(self, ev: DpEvent, route_name: Callable[[int], str],
            cluster_of_pool: Callable[[int], str]) -> None:
        outcome = OUTCOMES.get(ev.outcome, str(ev.outcome))
        self.entries.append({
            "start_time": time.strftime(
                "%Y-%m-%dT%H:%M:%S", time.gmtime(self.boot_offset + ev.ts_ns / 1e9)),
            "route_name": route_name(ev.route),
            "upstream_cluster": cluster_of_pool(ev.pool) if outcome == "fast" else "",
            "response_code": ev.status if outcome == "kernel_reply" else None,
            "bytes_received": ev.bytes,
            "upstream_local_address": None,
            "downstream_local_address": f"{socket.inet_ntoa(ev.dst_ip.to_bytes(4, 'little'))}:"
                                        f"{ev.dst_port}",
            "connection_id": ev.cookie,
            "response_flags": "" if outcome != "envoy" else "-",
            "x_l7fp_outcome": outcome,
            "x_l7fp_reason": reason_name(ev.reason),
        })

    def tail(self, n: int = 100) -> list[dict[str, Any]]:
        return list(self.entries)[-n:]


class FastpathCollector:
    """prometheus_client collector: reads the kernel counters of every node at scrape time.

    `source` returns (node id, {(route name, outcome, reason): count}) pairs.
    """

    def __init__(self, source: Callable[[], Iterable[tuple[str, dict[tuple[str, str, str], int]]]],
                 timeouts: Callable[[], Iterable[tuple[str, dict[str, int]]]] | None = None,
                 resets: Callable[[], Iterable[tuple[str, dict[str, int]]]] | None = None
                 ) -> None:
        """`timeouts` returns (node id, {kind: count}) of the route timer
        (fastpath.timeouts: timeout_504, timeout_reset, timeout_raced,
        timeout_retried); `resets` the same of fastpath.agent_reset (reset_503,
        reset_retried, reset_raced, reset_client_gone)."""
        self.source = source
        self.timeouts = timeouts
        self.resets = resets

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily(
            "l7fp_fastpath_requests", "Requests seen by the kernel fast path, by route, "
            "outcome (fast, kernel_reply, envoy) and reason", labels=["node", "route", "outcome",
                                                                     "reason"])
        for node, stats in self.source():
            for (route, outcome, reason), n in sorted(stats.items()):
                fam.add_metric([node, route, outcome, reason], n)
        yield fam
        if self.timeouts is not None:
            tmo = CounterMetricFamily(
                "l7fp_fastpath_timeouts", "Route timeouts the fast path enforced: 504 sent "
                "(timeout_504), client connection cut (timeout_reset), response completed "
                "while the timer fired (timeout_raced)", labels=["node", "kind"])
            for node, counts in self.timeouts():
                for kind, n in sorted(counts.items()):
                    tmo.add_metric([node, kind], n)
            yield tmo
        if self.resets is not None:
            rst = CounterMetricFamily(
                "l7fp_fastpath_resets", "Upstream apps that closed before answering a fast-path "
                "request: Envoy's 503 sent (reset_503), handed to the retry agent "
                "(reset_retried), the route timer answered first (reset_raced)",
                labels=["node", "kind"])
            for node, counts in self.resets():
                for kind, n in sorted(counts.items()):
                    rst.add_metric([node, kind], n)
            yield rst

    def describe(self) -> list[Any]:
        return []
