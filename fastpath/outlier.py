"""Outlier detection on kernel routes: Envoy 1.40's rules, sans I/O.

Owner: NAME=outlier. Callers: `fastpath.classify` (`config_of`, `unsupported`:
which clusters the kernel may own), `fastpath.agent_outlier` (`Detector`:
time, ejection multiplier, max_ejection_percent, on the agent's thread).

What Envoy does (source/common/upstream/outlier_detection_impl.cc, 1.40; the
numbers below are its defaults), and who owns each part here:

* Per host, per cluster: a response 5xx increments `consecutive_5xx`, a 502,
  503 or 504 also `consecutive_gateway_failure` (another 5xx zeroes the
  latter), any other status zeroes both. A counter *reaching* its threshold
  (5 and 5) asks for an ejection and is zeroed. Kernel (bpf_src/dp_outlier.h,
  on the first response write of each request).
* An ejection happens when `enforcing_*` says so (5xx: 100 %, gateway: 0 %)
  and 100 * (ejected + 1) / hosts <= max_ejection_percent (10), or when
  always_eject_one_host and nothing is ejected. Kernel, against the bound the
  agent computes from those rules (`allowed_ejections`: dp_od_det.allowed).
* Every `interval` (10 s) a host ejected for at least
  min(base_ejection_time (30 s) * multiplier, max_ejection_time (300 s, at
  least base)) + jitter comes back, its counters zeroed. The multiplier grows
  by one at each ejection (while multiplier * base < max + base) and shrinks
  by one at each tick the host has been back for a whole interval. Agent.
* The LB skips ejected hosts unless fewer than healthy_panic_threshold (50 %)
  of the hosts are healthy (panic: every host). Kernel, at the pick.
* Envoy's workers see a health change (ejection, unejection) at once only
  when the cluster's last such update was delivered more than
  common_lb_config.update_merge_window (1 s) ago; else it is merged and
  delivered when that window ends (ClusterManagerImpl::scheduleUpdate): seen
  with Envoy 1.40 in the mesh, a host ejected again within 1 s of its
  unejection kept getting requests for that second. Kernel (dp_od_merge
  decides, for the kernel's ejections and the agent's changes alike; `merge`
  is the rule's statement it is tested against) and agent (delivers the
  merged ones when their window ended).
* Success-rate and failure-percentage detection run at the ticks and never
  fire with fewer than success_rate_minimum_hosts / failure_percentage_minimum_hosts
  hosts (5 and 5): the kernel ignores them only then (`unsupported`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

DEFAULT_INTERVAL_MS = 10_000
DEFAULT_BASE_MS = 30_000
DEFAULT_MAX_EJECTION_MS = 300_000
DEFAULT_MAX_PERCENT = 10
DEFAULT_MIN_HOSTS = 5  # success_rate_minimum_hosts and failure_percentage_minimum_hosts


@dataclass(frozen=True)
class OutlierConfig:
    """The fields of an Envoy OutlierDetection the kernel implements (ms, counts, %).

    `threshold_5xx` / `threshold_gateway` are 0 when that detection is not
    enforced (Envoy then detects without ejecting: no state change)."""

    threshold_5xx: int = 5
    threshold_gateway: int = 0
    interval_ms: int = DEFAULT_INTERVAL_MS
    base_ms: int = DEFAULT_BASE_MS
    max_ejection_ms: int = DEFAULT_MAX_EJECTION_MS
    jitter_ms: int = 0
    max_percent: int = DEFAULT_MAX_PERCENT
    always_eject_one: bool = False
    panic_percent: float = 50.0
    merge_window_ms: int = 1000  # common_lb_config.update_merge_window
    # split_external_local_origin_errors: local-origin events (connect failure,
    # timeout, reset) leave the 5xx/gateway counters and count in their own
    # (consecutive_local_origin_failure, 0: not enforced), zeroed by every
    # attempt that got a connection (Envoy's LocalOriginConnectSuccess)
    split: bool = False
    threshold_local: int = 0


def _ms(v: Any, default: int) -> int:
    """A Duration as the JSON of an Envoy resource ("1.5s") or a dict, in ms."""
    if v is None:
        return default
    if isinstance(v, dict):
        return int(int(v.get("seconds", 0)) * 1000 + int(v.get("nanos", 0)) // 1_000_000)
    s = str(v)
    if not s.endswith("s"):
        raise ValueError(f"outlier detection duration {v!r}: expected like '1.5s'")
    return int(round(float(s[:-1]) * 1000))


def _u32(od: dict[str, Any], key: str, default: int) -> int:
    v = od.get(key)
    if isinstance(v, dict):  # a wrapper as {"value": N}
        v = v.get("value")
    return default if v is None else int(v)


def _panic(cluster: dict[str, Any]) -> float:
    p = cluster.get("commonLbConfig", {}).get("healthyPanicThreshold")
    if p is None:
        return 50.0
    return float(p.get("value", 0.0))  # proto3: a Percent without value is 0


def _fields(cluster: dict[str, Any]) -> dict[str, Any] | None:
    """The cluster's outlier_detection, keys as Envoy's JSON spells them
    (betterproto2's to_dict writes consecutive5Xx for consecutive_5xx)."""
    od = cluster.get("outlierDetection")
    return None if od is None else {k.replace("5Xx", "5xx"): v for k, v in od.items()}


def config_of(cluster: dict[str, Any]) -> OutlierConfig | None:
    """The kernel's config for an Envoy cluster (JSON, camelCase), None without
    outlier detection. Callers check `unsupported` first."""
    od = _fields(cluster)
    if od is None:
        return None
    enf5 = _u32(od, "enforcingConsecutive5xx", 100)
    enfg = _u32(od, "enforcingConsecutiveGatewayFailure", 0)
    base = _ms(od.get("baseEjectionTime"), DEFAULT_BASE_MS)
    return OutlierConfig(
        threshold_5xx=_u32(od, "consecutive5xx", 5) if enf5 else 0,
        threshold_gateway=_u32(od, "consecutiveGatewayFailure", 5) if enfg else 0,
        interval_ms=_ms(od.get("interval"), DEFAULT_INTERVAL_MS),
        base_ms=base,
        max_ejection_ms=_ms(od.get("maxEjectionTime"), max(DEFAULT_MAX_EJECTION_MS, base)),
        jitter_ms=_ms(od.get("maxEjectionTimeJitter"), 0),
        max_percent=min(100, _u32(od, "maxEjectionPercent", DEFAULT_MAX_PERCENT)),
        always_eject_one=bool(_u32(od, "alwaysEjectOneHost", 0)),
        panic_percent=_panic(cluster),
        merge_window_ms=_ms(cluster.get("commonLbConfig", {}).get("updateMergeWindow"), 1000),
        split=bool(od.get("splitExternalLocalOriginErrors")),
        threshold_local=_local_threshold(od))


def _local_threshold(od: dict[str, Any]) -> int:
    """consecutive_local_origin_failure when split and enforced (100 %), else 0."""
    if not od.get("splitExternalLocalOriginErrors") or \
            not _u32(od, "enforcingConsecutiveLocalOriginFailure", 100):
        return 0
    return _u32(od, "consecutiveLocalOriginFailure", 5)


def unsupported(cluster: dict[str, Any], n_hosts: int) -> list[str]:
    """Why the kernel cannot own this cluster's outlier detection ([] : it can).

    `n_hosts`: the cluster's endpoint count (success rate and failure
    percentage never run below their minimum host counts)."""
    od = _fields(cluster)
    if od is None:
        return []
    out = []
    for key, default in (("enforcingConsecutive5xx", 100), ("enforcingConsecutiveGatewayFailure", 0)):
        if _u32(od, key, default) not in (0, 100):
            out.append(f"outlier detection {key} {_u32(od, key, default)} % (random enforcement)")
    if _u32(od, "consecutive5xx", 5) == 0 and _u32(od, "enforcingConsecutive5xx", 100):
        out.append("outlier detection consecutive_5xx 0")
    if od.get("splitExternalLocalOriginErrors"):
        out += _local_unsupported(od, n_hosts)
    if _u32(od, "detectDegradedHosts", 0):
        out.append("outlier detection detect_degraded_hosts")
    if _u32(od, "enforcingSuccessRate", 100) and n_hosts >= _u32(od, "successRateMinimumHosts",
                                                                 DEFAULT_MIN_HOSTS):
        out.append("outlier detection by success rate (enforced, enough hosts)")
    if _u32(od, "enforcingFailurePercentage", 0) and \
            n_hosts >= _u32(od, "failurePercentageMinimumHosts", DEFAULT_MIN_HOSTS):
        out.append("outlier detection by failure percentage (enforced, enough hosts)")
    if n_hosts > MAX_HOSTS:
        out.append(f"outlier detection on more than {MAX_HOSTS} endpoints")
    try:
        config_of(cluster)
    except ValueError as exc:
        return out + [str(exc)]
    return out


MAX_HOSTS = 16  # DP_OD_EPS: endpoints per cluster the kernel's pick looks at

# An upstream attempt without a response status is a local-origin event (Envoy's
# router reports it with putResult); as an observation's code (fastpath.als):
LOCAL_CONNECT_FAILED = -1  # no connection (pool failure): LocalOriginConnectFailed only
LOCAL_RESET = -2  # reset or protocol error after connecting: ConnectSuccess, then ConnectFailed
LOCAL_TIMEOUT = -3  # per-try (idle) or route timeout after connecting: ConnectSuccess, then Timeout
# ...a route timeout of a request with x-envoy-upstream-rq-timeout-alt-response
# that Envoy honoured (an internal request): the router's timeout code is 204
LOCAL_TIMEOUT_ALT = -4
# ...and what a detector without split_external_local_origin_errors counts for
# it: resultToHttpCode's 503, the router's timeout code for a timeout (504, or
# 204, a success, with the alt-response header)
AS_STATUS = {LOCAL_CONNECT_FAILED: 503, LOCAL_RESET: 503, LOCAL_TIMEOUT: 504, LOCAL_TIMEOUT_ALT: 204}


def envoy_events(code: int, cfg: OutlierConfig) -> list[tuple[str, int]]:
    """What Envoy's detector of `cfg` counts for one upstream attempt with
    observation code `code` (a status, or LOCAL_*), in its order: ("status",
    s) into the 5xx/gateway counters, ("local", 0) the attempt's connection
    (LocalOriginConnectSuccess), ("local", 1) a local-origin failure. Local
    events only with split and a local threshold (otherwise they change
    nothing); without split a local-origin event is its status."""
    if not cfg.split:
        return [("status", code if code > 0 else AS_STATUS[code])]
    local = bool(cfg.threshold_local)
    if code == LOCAL_CONNECT_FAILED:
        return [("local", 1)] if local else []
    out = [("local", 0)] if local else []
    if code > 0:
        return out + [("status", code)]
    return out + [("local", 1)] if local else []


def _local_unsupported(od: dict[str, Any], n_hosts: int) -> list[str]:
    """With split_external_local_origin_errors: the local-origin detections
    the kernel does not run (consecutive local-origin failures it does)."""
    out = []
    enf = _u32(od, "enforcingConsecutiveLocalOriginFailure", 100)
    if enf not in (0, 100):
        out.append(f"outlier detection enforcingConsecutiveLocalOriginFailure {enf} % "
                   "(random enforcement)")
    if enf and _u32(od, "consecutiveLocalOriginFailure", 5) == 0:
        out.append("outlier detection consecutive_local_origin_failure 0")
    if _u32(od, "enforcingLocalOriginSuccessRate", 100) and \
            n_hosts >= _u32(od, "successRateMinimumHosts", DEFAULT_MIN_HOSTS):
        out.append("outlier detection by local-origin success rate (enforced, enough hosts)")
    if _u32(od, "enforcingFailurePercentageLocalOrigin", 0) and \
            n_hosts >= _u32(od, "failurePercentageMinimumHosts", DEFAULT_MIN_HOSTS):
        out.append("outlier detection by local-origin failure percentage (enforced, enough hosts)")
    return out


def allowed_ejections(cfg: OutlierConfig, n: int) -> int:
    """How many of `n` hosts may be ejected at once (Envoy's ejectHost test,
    100 * (ejected + 1) / n <= max_percent, or the first with always_eject_one)."""
    k = 0
    while k < n and 100.0 * (k + 1) / n <= cfg.max_percent:
        k += 1
    if cfg.always_eject_one and k == 0 and n > 0:
        k = 1
    return k


def merge(now_ns: int, last_ns: int, pending: bool, window_ns: int) -> str:
    """What Envoy's cluster manager does with a health change at `now_ns` (the
    rule the kernel applies in dp_od_merge; this is its sans-I/O statement,
    the reference of tests/fastpath_unit/test_agent_outlier.py's run of it):
    "now" (delivered to the LB at once; a pending merged update goes with it),
    "schedule" (merged: delivered at now + window) or "join" (merged into the
    update already pending)."""
    if window_ns and now_ns - last_ns <= window_ns:
        return "join" if pending else "schedule"
    return "now"


@dataclass
class HostState:
    """What the agent keeps per host (Envoy's DetectorHostMonitorImpl timing part)."""

    multiplier: int = 0  # ejectTimeBackoff
    ejected_ns: int | None = None  # kernel's ktime of the current ejection
    jitter_ms: int = 0
    last_unejected_ns: int | None = None
    ejections: int = 0


@dataclass
class Detector:
    """One cluster's detector (agent thread). Hosts are keys (e.g. "ip:port").

    The kernel ejects; the agent calls `noticed` for each ejection it finds,
    then `tick(now)` every interval: it returns the hosts to bring back."""

    cfg: OutlierConfig
    hosts: dict[str, HostState] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)

    def set_hosts(self, keys: list[str]) -> None:
        """The cluster's hosts now (an EDS change keeps the others' state)."""
        self.hosts = {k: self.hosts.get(k) or HostState() for k in keys}

    def ejected(self) -> int:
        return sum(1 for h in self.hosts.values() if h.ejected_ns is not None)

    def room(self) -> int:
        """Ejections still allowed now (dp_od_det.allowed - ejected in the kernel)."""
        return max(0, allowed_ejections(self.cfg, len(self.hosts)) - self.ejected())

    def noticed(self, key: str, ejected_ns: int) -> None:
        """The kernel ejected `key` at `ejected_ns` (monotonic ns)."""
        h = self.hosts[key]
        if h.ejected_ns is not None:
            return
        h.ejected_ns, h.ejections = ejected_ns, h.ejections + 1
        h.jitter_ms = self.rng.randint(0, self.cfg.jitter_ms) if self.cfg.jitter_ms else 0
        if h.multiplier * self.cfg.base_ms < self.cfg.max_ejection_ms + self.cfg.base_ms:
            h.multiplier += 1

    def tick(self, now_ns: int) -> list[str]:
        """Envoy's onIntervalTimer: unejections due, then the multiplier's decay."""
        back = []
        for key, h in self.hosts.items():
            if h.ejected_ns is None:
                continue
            due = min(self.cfg.base_ms * h.multiplier, self.cfg.max_ejection_ms) + h.jitter_ms
            if due * 1_000_000 <= now_ns - h.ejected_ns:
                h.ejected_ns, h.last_unejected_ns = None, now_ns
                back.append(key)
        for key, h in self.hosts.items():
            if h.ejected_ns is None and h.last_unejected_ns is not None and key not in back \
                    and now_ns - h.last_unejected_ns >= self.cfg.interval_ms * 1_000_000 \
                    and h.multiplier:
                h.multiplier -= 1
        return back
