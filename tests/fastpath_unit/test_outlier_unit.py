"""Outlier detection's sans-I/O rules (fastpath/outlier.py) and the split's
verdict for clusters with outlier detection (fastpath.classify)."""

from __future__ import annotations

import random
from typing import Any

from fastpath import outlier
from fastpath.classify import classify_cluster
from fastpath.outlier import Detector, OutlierConfig, allowed_ejections, config_of
from fastpath.plan import Verdict

MS = 1_000_000


def cluster(od: dict[str, Any] | None, n: int = 3, **extra: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"name": "c", "type": "STATIC", "lbPolicy": "ROUND_ROBIN",
                         "loadAssignment": {"clusterName": "c", "endpoints": [{"lbEndpoints": [
                             {"endpoint": {"address": {"socketAddress": {
                                 "address": f"198.18.0.{i + 2}", "portValue": 80}}}}
                             for i in range(n)]}]}, **extra}
    if od is not None:
        c["outlierDetection"] = od
    return c


def test_envoy_defaults() -> None:
    cfg = config_of(cluster({}))
    assert cfg == OutlierConfig(threshold_5xx=5, threshold_gateway=0, interval_ms=10_000,
                                base_ms=30_000, max_ejection_ms=300_000, max_percent=10,
                                panic_percent=50.0)
    # a base above 300 s raises the default max_ejection_time to it
    assert config_of(cluster({"baseEjectionTime": "400s"})).max_ejection_ms == 400_000  # type: ignore[union-attr]
    assert config_of(cluster(None)) is None


def test_enforcing_zero_turns_a_detection_off() -> None:
    cfg = config_of(cluster({"enforcingConsecutive5xx": 0, "consecutiveGatewayFailure": 2,
                             "enforcingConsecutiveGatewayFailure": 100}))
    assert cfg is not None and (cfg.threshold_5xx, cfg.threshold_gateway) == (0, 2)


def test_max_ejection_percent_and_always_one() -> None:
    # 100 * (ejected + 1) / n <= max: 10 % of 3 hosts ejects none (Envoy's default)
    assert allowed_ejections(OutlierConfig(max_percent=10), 3) == 0
    assert allowed_ejections(OutlierConfig(max_percent=10, always_eject_one=True), 3) == 1
    assert allowed_ejections(OutlierConfig(max_percent=50), 3) == 1
    assert allowed_ejections(OutlierConfig(max_percent=100), 3) == 3
    assert allowed_ejections(OutlierConfig(max_percent=20), 10) == 2


def test_detector_times_as_envoy() -> None:
    cfg = OutlierConfig(interval_ms=500, base_ms=1000, max_ejection_ms=300_000, max_percent=100)
    d = Detector(cfg, rng=random.Random(1))
    d.set_hosts(["a", "b", "c"])
    assert d.room() == 3
    d.noticed("a", 0)
    assert d.hosts["a"].multiplier == 1 and d.room() == 2
    assert d.tick(500 * MS) == []  # 0.5 s < 1 s
    assert d.tick(1000 * MS) == ["a"]  # back at the tick after base x 1
    d.noticed("a", 1100 * MS)  # ejected again at once: multiplier 2
    assert d.hosts["a"].multiplier == 2
    assert d.tick(2500 * MS) == []  # 1.4 s < 2 s
    assert d.tick(3500 * MS) == ["a"]
    assert d.tick(4000 * MS) == [] and d.hosts["a"].multiplier == 1  # back a whole interval
    assert d.tick(4500 * MS) == [] and d.hosts["a"].multiplier == 0


def test_multiplier_capped_by_max_ejection_time() -> None:
    cfg = OutlierConfig(interval_ms=100, base_ms=1000, max_ejection_ms=2000)
    d = Detector(cfg)
    d.set_hosts(["a"])
    t = 0
    for _ in range(5):
        d.noticed("a", t)
        t += 3000 * MS
        assert d.tick(t) == ["a"]
    assert d.hosts["a"].multiplier == 3  # grows while multiplier x base < max + base


def test_unsupported_fields_name_themselves() -> None:
    assert outlier.unsupported(cluster({"consecutive5xx": 3, "maxEjectionPercent": 50}), 3) == []
    why = outlier.unsupported(cluster({"enforcingConsecutive5xx": 50}), 3)
    assert why and "enforcingConsecutive5xx 50" in why[0]
    split = {"splitExternalLocalOriginErrors": True}
    assert outlier.unsupported(cluster(split), 3) == []  # below 5 hosts: success rates never run
    assert any("local-origin success rate" in w
               for w in outlier.unsupported(cluster({**split, "enforcingSuccessRate": 0}), 5))
    assert outlier.unsupported(cluster({**split, "enforcingSuccessRate": 0,
                                        "enforcingLocalOriginSuccessRate": 0}), 9) == []
    assert any("enforcingConsecutiveLocalOriginFailure 50" in w for w in outlier.unsupported(
        cluster({**split, "enforcingConsecutiveLocalOriginFailure": 50}), 3))
    # success rate: Envoy's default enforcing 100 %, but never below 5 hosts
    assert outlier.unsupported(cluster({}), 4) == []
    assert any("success rate" in w for w in outlier.unsupported(cluster({}), 5))
    assert outlier.unsupported(cluster({"enforcingSuccessRate": 0}), 9) == []
    assert any("failure percentage" in w for w in outlier.unsupported(
        cluster({"enforcingSuccessRate": 0, "enforcingFailurePercentage": 100}), 5))


def test_every_host_ejectable_without_panic_gets_the_no_healthy_reply() -> None:
    """Istio's default (panic 0) with maxEjectionPercent 100: every host can be
    ejected; Envoy then answers 503 "no healthy upstream", which the
    synthesized plan carries for dp_outlier.h to send."""
    from fastpath import plan as P
    from fastpath.synth import synthesize

    panic0 = {"commonLbConfig": {"healthyPanicThreshold": {"value": 0}}}
    assert outlier.unsupported(cluster({"maxEjectionPercent": 100}, **panic0), 3) == []
    c = classify_cluster(cluster({"maxEjectionPercent": 100}, **panic0), {})
    assert c.verdict is Verdict.KERNEL and c.outlier is not None
    vh = P.VirtualHost("c", ("*",), (P.Route("r", P.RouteMatch(P.PathKind.PREFIX, "/"),
                                             P.ClusterAction((P.WeightedCluster("c", 1),)),
                                             Verdict.KERNEL),))
    lp = P.ListenerPlan("out", "0.0.0.0", 80, P.Direction.OUTBOUND, (vh,))
    sp = synthesize(P.KernelPlan("n", "1", (lp,), (c,)))
    idx = sp.no_healthy["c"]
    body = sp.rows["l7fp_replies"][idx]
    assert b"503 Service Unavailable" in body and body.rstrip(b"\0").endswith(b"no healthy upstream")
    panic50 = classify_cluster(cluster({"maxEjectionPercent": 100}), {})
    assert "c" not in synthesize(P.KernelPlan("n", "1", (lp,), (panic50,))).no_healthy


def test_classify_outlier_cluster_kernel_with_config() -> None:
    c = classify_cluster(cluster({"consecutive5xx": 3, "interval": "0.5s",
                                  "baseEjectionTime": "1s", "maxEjectionPercent": 50},
                                 commonLbConfig={"healthyPanicThreshold": {"value": 0}}), {})
    assert c.verdict is Verdict.KERNEL, c.reason
    assert c.outlier == OutlierConfig(threshold_5xx=3, interval_ms=500, base_ms=1000,
                                      max_percent=50, panic_percent=0.0)
    ring = classify_cluster(cluster({}, lbPolicy="RING_HASH"), {})
    assert ring.verdict is Verdict.ENVOY and "hash load balancer" in ring.reason
    # Cilium's CiliumEnvoyConfig examples: split, consecutive_local_origin_failure 2
    split = classify_cluster(cluster({"splitExternalLocalOriginErrors": True,
                                      "consecutiveLocalOriginFailure": 2}), {})
    assert split.verdict is Verdict.KERNEL, split.reason
    assert split.outlier is not None and (split.outlier.split, split.outlier.threshold_local) == (True, 2)
    off = config_of(cluster({"splitExternalLocalOriginErrors": True,
                             "enforcingConsecutiveLocalOriginFailure": 0}))
    assert off is not None and (off.split, off.threshold_local) == (True, 0)


def test_envoy_events_of_an_attempt_split_or_not() -> None:
    """What Envoy's detector counts for one upstream attempt (router + its
    putResult*): without split a local-origin event is its status; with
    split a status also says the attempt was connected, a connect failure is
    a local failure only, a timeout or reset after connecting both."""
    plain, split = OutlierConfig(), OutlierConfig(split=True, threshold_local=2)
    assert outlier.envoy_events(503, plain) == [("status", 503)]
    assert outlier.envoy_events(outlier.LOCAL_TIMEOUT, plain) == [("status", 504)]
    assert outlier.envoy_events(outlier.LOCAL_CONNECT_FAILED, plain) == [("status", 503)]
    assert outlier.envoy_events(500, split) == [("local", 0), ("status", 500)]
    assert outlier.envoy_events(outlier.LOCAL_CONNECT_FAILED, split) == [("local", 1)]
    assert outlier.envoy_events(outlier.LOCAL_TIMEOUT, split) == [("local", 0), ("local", 1)]
    assert outlier.envoy_events(outlier.LOCAL_RESET, split) == [("local", 0), ("local", 1)]
    # the alt-response route timeout: putResult(LocalOriginTimeout, 204): without
    # split the code, a success; with split the code is not read
    assert outlier.envoy_events(outlier.LOCAL_TIMEOUT_ALT, plain) == [("status", 204)]
    assert outlier.envoy_events(outlier.LOCAL_TIMEOUT_ALT, split) == [("local", 0), ("local", 1)]
    unenforced = OutlierConfig(split=True, threshold_local=0)
    assert outlier.envoy_events(outlier.LOCAL_TIMEOUT, unenforced) == []
    assert outlier.envoy_events(200, unenforced) == [("status", 200)]


def test_betterproto_spelling_of_5xx() -> None:
    """to_dict of the betterproto2 message writes consecutive5Xx (Envoy: consecutive5xx)."""
    cfg = config_of(cluster({"consecutive5Xx": 3, "enforcingConsecutive5Xx": 100}))
    assert cfg is not None and cfg.threshold_5xx == 3
    assert config_of(cluster({"enforcingConsecutive5Xx": 0})).threshold_5xx == 0  # type: ignore[union-attr]


def test_merge_window_rule() -> None:
    """ClusterManagerImpl::scheduleUpdate: at once out of the window, else merged."""
    w = 1000 * MS
    assert outlier.merge(0 + 2 * w, 0, False, w) == "now"
    assert outlier.merge(500 * MS, 0, False, w) == "schedule"
    assert outlier.merge(600 * MS, 0, True, w) == "join"
    assert outlier.merge(1500 * MS, 0, True, w) == "now"  # cancels the timer, delivers all
    assert outlier.merge(10, 0, False, 0) == "now"  # update_merge_window 0s
    cfg = config_of(cluster({}, commonLbConfig={"updateMergeWindow": "0s"}))
    assert cfg is not None and cfg.merge_window_ms == 0
