"""mesh.audit without a mesh: who served a request from counter changes, refusals, the table."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from fastpath.audit_probe import Probe
from fastpath.reference import Request
from mesh.audit import (
    POOLS_EMPTY,
    AuditError,
    Row,
    check_state,
    format_rows,
    pools_settled,
)
from mesh.audit_verdict import check_answer, check_plan, classify, summary
from mesh.cli import audit_status

PROBE = Probe("l", "vh", "r", "198.19.0.2", 80, Request("GET", "/", "h"))
INBOUND = Probe("virtualInbound", "in", "", "198.19.0.2", 80, Request("GET", "/", "h"),
                via="l/vh/r", dst=("198.18.0.5", 80))


def test_kernel_outcomes_are_the_kernel() -> None:
    assert classify(PROBE, Counter({("l/vh/r", "fast", ""): 1}))[:2] == ("kernel", "fast")
    assert classify(PROBE, Counter({("l/vh/r", "kernel_reply", ""): 1}))[:2] == \
        ("kernel", "kernel_reply")


def test_any_envoy_count_is_envoy_with_its_reasons() -> None:
    got = classify(PROBE, Counter({("l/vh/r", "cork", ""): 1, ("l/vh/r", "envoy", "pool_empty"): 1}))
    assert got == ("envoy", "pool_empty", {"l/vh/r cork": 1, "l/vh/r envoy/pool_empty": 1})


def test_other_virtual_hosts_counts_are_other_traffic() -> None:
    served, why, _ = classify(PROBE, Counter({("l/vh2/other", "envoy", "sticky"): 3}))
    assert served == "unseen" and "no fast-path counter moved" in why


def test_a_count_on_an_earlier_route_of_the_virtual_host_is_named() -> None:
    """Seen on bookinfo with an Istio `authority` match: GET / for the catch-all
    route was punted at the earlier ENVOY route (counted there, punt_route)."""
    got = classify(PROBE, Counter({("l/vh/auth", "envoy", "punt_route"): 1}))
    assert got == ("envoy", "punt_route (counted on l/vh/auth)", {"l/vh/auth envoy/punt_route": 1})


def test_inbound_probe_counts_on_the_callers_route_and_merged_ones() -> None:
    assert classify(INBOUND, Counter({("l/vh/r", "envoy", "punt_route"): 1}))[:2] == \
        ("envoy", "punt_route")
    merged = ("virtualInbound@inbound:198.18.0.5:80/in/", "kernel_reply", "")
    assert classify(INBOUND, Counter({merged: 1}))[0] == "kernel"


@pytest.mark.parametrize("route", ["virtualInbound@inbound:198.18.0.6:80/in/",  # a replica
                                   "virtualInbound@inbound:198.18.0.5:80/in/admin"])  # another route
def test_an_inbound_count_on_another_pod_or_route_is_not_this_route(route: str) -> None:
    """The caller's kernel picked a replica, or matched another inbound route of
    this pod: the probed route of this pod was not what served it."""
    got = classify(INBOUND, Counter({(route, "fast", ""): 1}))
    assert got[:2] == ("kernel (other route)", f"fast (counted on {route})")
    assert audit_status(summary([Row("d-0", INBOUND, *got[:2], 200)])) == 3


def test_a_kernel_count_on_an_earlier_route_is_not_this_route() -> None:
    """The kernel and the reference model disagree about which route matches
    first: another KERNEL route answered; the audit must not report success."""
    served, why, _ = classify(PROBE, Counter({("l/vh/first", "kernel_reply", ""): 1}))
    assert (served, why) == ("kernel (other route)", "kernel_reply (counted on l/vh/first)")
    row = Row("a-0", PROBE, served, why, 403)
    assert audit_status(summary([row])) == 3
    assert "kernel (other route) (kernel_reply (counted on l/vh/first))" in format_rows([row])[1]


def test_more_than_one_request_counted_during_a_probe_is_ambiguous() -> None:
    """Other traffic on the probed route during the probe: whose outcome is it?"""
    two = Counter({("l/vh/r", "fast", ""): 1, ("l/vh/r", "kernel_reply", ""): 1})
    assert classify(PROBE, two)[:2] == ("ambiguous", "2 requests counted during it: kernel "
                                        "(fast,kernel_reply)")
    # a head waiting for bytes, a diverted response, a failed retry copy: one request
    one = Counter({("", "cork", ""): 1, ("l/vh/r", "fast", ""): 1, ("l/vh/r", "retry", ""): 1,
                   ("l/vh/r", "fast", "retry_lost"): 1})
    assert classify(PROBE, one)[0] == "kernel"


def test_a_reply_the_model_is_sure_of_is_compared_with_the_answer() -> None:
    """A route the model says the kernel answers 403 (a deny) that got 200 was
    not served as Envoy would: not "kernel"."""
    deny = Probe("l", "vh", "r", "198.19.0.2", 80, Request("GET", "/", "h"), expect="reply 403",
                 reply=403)
    assert check_answer(deny, "kernel", "kernel_reply", {"status": 403, "error": ""}) == \
        ("kernel", "kernel_reply")
    got = check_answer(deny, "kernel", "fast", {"status": 200, "error": ""})
    assert got == ("kernel (wrong status)", "fast; expected status 403, got 200")
    assert audit_status(summary([Row("a-0", deny, *got, 200)])) == 3
    # a forward: its status is the app's, not compared
    assert check_answer(PROBE, "kernel", "fast", {"status": 200, "error": ""}) == ("kernel", "fast")
    lost = check_answer(PROBE, "kernel", "fast", {"status": 0, "error": "no answer within 7 s"})
    assert lost == ("kernel (no answer)", "fast; no answer within 7 s")


def test_an_inbound_probe_from_another_destination_plan_than_the_kernel_merged() -> None:
    """The audit derived the inbound request from destination plan v2; the
    sender's kernel still decides that pod's inbound side with v1: not "kernel"."""
    from dataclasses import replace
    probe = replace(INBOUND, dst_version="v2")
    node = {"inbound_plans": {"198.18.0.5:80": "v1"}}
    assert check_plan(probe, "kernel", "fast", node) == (
        "kernel (other plan)", "fast; the sender's kernel merged destination plan v1, the audit "
                               "read v2")
    assert check_plan(probe, "kernel", "fast", {"inbound_plans": {"198.18.0.5:80": "v2"}}) == \
        ("kernel", "fast")
    assert check_plan(PROBE, "kernel", "fast", node) == ("kernel", "fast")  # an outbound probe


def test_refusals_name_the_mesh() -> None:
    with pytest.raises(AuditError, match="mesh 'm' is not running"):
        check_state(None, "m")
    with pytest.raises(AuditError, match="mesh 'm' runs with the fast path off"):
        check_state({"fastpath": "off", "sidecars": "envoy"}, "m")


def test_table_ends_with_the_summary_and_reasons() -> None:
    rows = [Row("a-0", PROBE, "kernel", "fast", 200),
            Row("a-0", PROBE, "envoy", "no_pool", 200),
            Row("b-0", Probe("l", "vh", "s", "", 80, None, skip="shadowed by route 'r'"),
                "skipped", "shadowed by route 'r'")]
    assert summary(rows) == {"kernel": 1, "audited": 2, "skipped": 1,
                             "not_kernel": {"envoy: no_pool": 1}}
    lines = format_rows(rows)
    assert lines[-3:] == ["KERNEL routes served by the kernel: 1 / 2 (1 more skipped, no request sent)",
                          "  not by the kernel: 1 x envoy: no_pool",
                          "  skipped: 1 x shadowed by route 'r'"]


def test_wait_stops_when_only_pools_stay_empty() -> None:
    since: dict[str, float] = {}
    assert not pools_settled({"a": POOLS_EMPTY, "b": "datapath runs plan 1"}, since, 0.0, 5.0)
    assert not pools_settled({"a": POOLS_EMPTY}, since, 4.0, 5.0)
    assert pools_settled({"a": POOLS_EMPTY}, since, 5.0, 5.0)
    # a pool refilled meanwhile starts the count again
    assert not pools_settled({"a": "datapath runs plan 2"}, since, 6.0, 5.0)
    assert not pools_settled({"a": POOLS_EMPTY}, since, 7.0, 5.0)
    assert pools_settled({"a": POOLS_EMPTY}, since, 12.0, 5.0)


def test_wait_reads_a_newer_plan_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control plane pushed v2 after the audit read v1: the datapath runs v2,
    the wait must take v2 instead of waiting for v1 until --wait ends."""
    from fastpath.plan import KernelPlan
    from mesh import audit
    served = {"version": "v2"}

    def get(_admin: str, path: str) -> Any:
        if path.startswith("/debug/fastpath/plans"):
            return {"plan": KernelPlan("n1", served["version"], ()).to_json()}
        return {"enabled": True, "nodes": [{"node": "n1", "plan_version": "v2+in1", "pools": []}]}
    monkeypatch.setattr(audit, "_get", get)
    plans = {"a-0": KernelPlan("n1", "v1", ())}
    assert audit.wait_loaded("cp", [{"name": "a-0", "node_id": "n1"}], plans, 0) == {}
    assert plans["a-0"].version == "v2"


def test_a_request_http_client_refuses_is_that_rows_error() -> None:
    from mesh.audit_client import send
    got = send({"ip": "127.0.0.1", "port": 9, "method": "GET", "target": "/", "timeout": 1,
                "headers": [[":authority", "x"]]})
    assert got["status"] == 0 and got["error"].startswith("ValueError"), got


def test_exit_status_says_when_nothing_was_audited() -> None:
    from mesh.cli import audit_status
    skipped = Row("b-0", Probe("l", "vh", "s", "", 80, None, skip="x"), "skipped", "x")
    assert audit_status(summary([skipped])) == 4
    assert audit_status(summary([])) == 4
    assert audit_status(summary([skipped, Row("a-0", PROBE, "kernel", "fast", 200)])) == 0
    assert audit_status(summary([Row("a-0", PROBE, "envoy", "no_pool", 200)])) == 3


def _listener_to(name: str, *routes: tuple[str, str]) -> Any:
    """An outbound 0.0.0.0:9000 listener: (path prefix, cluster) routes, all named ""
    (as Istio's are)."""
    from fastpath.plan import (
        ClusterAction,
        Direction,
        ListenerPlan,
        PathKind,
        Route,
        RouteMatch,
        Verdict,
        VirtualHost,
        WeightedCluster,
    )
    rs = tuple(Route("", RouteMatch(PathKind.PREFIX, p), ClusterAction((WeightedCluster(c, 1),)),
                     Verdict.KERNEL) for p, c in routes)
    return ListenerPlan(name, "0.0.0.0", 9000, Direction.OUTBOUND, (VirtualHost("vh", ("*",), rs),))


def test_inbound_caller_is_the_first_that_reaches_the_pod() -> None:
    """a-0 ranks first (another service) but its wildcard listener never forwards to
    d-0; b-0's second unnamed route does: b-0 sends, through that route."""
    from fastpath.plan import (
        Cluster,
        ClusterAction,
        Direction,
        Endpoint,
        KernelPlan,
        LbPolicy,
        ListenerPlan,
        PathKind,
        Route,
        RouteMatch,
        Verdict,
        VirtualHost,
        WeightedCluster,
    )
    from mesh.audit import _caller_probes
    clusters = (Cluster("far", LbPolicy.RANDOM, (Endpoint("198.18.0.7", 9000),)),
                Cluster("d", LbPolicy.RANDOM, (Endpoint("198.18.0.5", 9000),)))
    inbound = ListenerPlan("virtualInbound", "0.0.0.0", 9000, Direction.INBOUND, (VirtualHost(
        "in", ("*",), (Route("", RouteMatch(PathKind.PREFIX, "/"), ClusterAction(
            (WeightedCluster("inbound", 1),)), Verdict.KERNEL),)),))
    plans = {"a-0": KernelPlan("a", "1", (_listener_to("out", ("/", "far")),), clusters),
             "b-0": KernelPlan("b", "1", (_listener_to("out", ("/x", "far"), ("/", "d")),),
                               clusters),
             "d-0": KernelPlan("d", "1", (inbound,))}
    pods = [{"name": "a-0", "service": "a", "ip": "198.18.0.2"},
            {"name": "b-0", "service": "d", "ip": "198.18.0.3"},
            {"name": "d-0", "service": "d", "ip": "198.18.0.5"}]
    found = _caller_probes({"services": []}, pods[2], 9000, pods, plans)
    assert found is not None and found[0]["name"] == "b-0"
    assert [(p.request is not None, p.via) for p in found[1]] == [(True, "out/vh/")]


class _SampledNode:
    """A sender's node and pod client (fakes of /debug/fastpath and
    mesh.audit_pod.PodClient): each request counts the next of `outcomes`
    ((outcome, reason)) on PROBE's route, as the kernel's counters would."""

    def __init__(self, outcomes: list[tuple[str, str]]) -> None:
        self.outcomes = outcomes
        self.sent = 0
        self.counts: Counter[tuple[str, str]] = Counter()

    def debug(self, _admin: str) -> dict[str, Any]:
        return {"enabled": True, "nodes": [{"node": "n1", "pools": [], "counters": [
            {"route": PROBE.full_name, "outcome": o, "reason": r, "requests": n}
            for (o, r), n in self.counts.items()]}]}

    def ask(self, _job: dict[str, Any], _timeout: float) -> dict[str, Any]:
        self.counts[self.outcomes[min(self.sent, len(self.outcomes) - 1)]] += 1
        self.sent += 1
        return {"status": 200, "error": ""}

    def close(self) -> None:
        pass

    def rows(self, monkeypatch: pytest.MonkeyPatch) -> list[Row]:
        from mesh import audit
        monkeypatch.setattr(audit, "_fastpath", self.debug)
        monkeypatch.setattr(audit, "PodClient", lambda _pod: self)
        sender = {"name": "client-0", "node_id": "n1"}
        return audit.send_probes({"admin": "cp"}, sender, "client-0", [PROBE], 1.0)


SAMPLED = ("envoy", "trace_sampled")


def test_a_route_whose_id_was_sampled_is_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen on a Zipkin mesh at 30 %: a probe's kernel-made id was sampled, the
    kernel handed it to Envoy (which reports the span) and the audit said
    "envoy (trace_sampled)": no verdict on the kernel path. Another request
    gets another id; the row is the first one not sampled, and says so."""
    node = _SampledNode([SAMPLED, SAMPLED, ("fast", "")])
    (row,) = node.rows(monkeypatch)
    assert (row.served, node.sent) == ("kernel", 3), row
    assert row.why == "fast; 2 request(s) before it trace_sampled"
    assert row.counters == {"l/vh/r envoy/trace_sampled": 2, "l/vh/r fast": 1}


def test_every_request_sampled_stays_envoy_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh.audit_verdict import TRACE_SAMPLED_TRIES
    node = _SampledNode([SAMPLED])
    (row,) = node.rows(monkeypatch)
    assert (row.served, node.sent) == ("envoy", TRACE_SAMPLED_TRIES), row
    assert row.why.startswith(f"trace_sampled ({TRACE_SAMPLED_TRIES} of {TRACE_SAMPLED_TRIES} ")
    assert summary([row])["kernel"] == 0


@pytest.mark.parametrize(("first", "served"), [(("envoy", "pool_empty"), "envoy"),
                                               (("fast", ""), "kernel")])
def test_any_other_result_is_asked_once(monkeypatch: pytest.MonkeyPatch,
                                         first: tuple[str, str], served: str) -> None:
    node = _SampledNode([first, ("fast", "")])
    (row,) = node.rows(monkeypatch)
    assert (row.served, row.why, node.sent) == (served, first[1] or first[0], 1)


def test_table_shows_probes_sent_again_after_trace_sampled() -> None:
    """A route served by the kernel on its third request, the two before it
    handed to Envoy as trace_sampled: the table says so on the row and under
    the summary; --json has `resent`. A row whose requests were all sampled
    stays not served by the kernel."""
    from fastpath.tracing import SAMPLED_REASON
    from mesh.audit_verdict import TRACE_SAMPLED_TRIES, after_sampled

    ok = Row("a-0", PROBE, *after_sampled("kernel", "fast", 2), 200, resent=2)
    tries = TRACE_SAMPLED_TRIES - 1
    gone = Row("a-0", PROBE, *after_sampled("envoy", SAMPLED_REASON, tries), 200, resent=tries)
    lines = format_rows([ok, gone])
    assert f"kernel (fast; 2 request(s) before it {SAMPLED_REASON})" in lines[1]
    assert f"envoy ({SAMPLED_REASON} ({TRACE_SAMPLED_TRIES} of {TRACE_SAMPLED_TRIES}" in lines[2]
    assert summary([ok, gone])["kernel"] == 1
    assert lines[-1] == (f"  sent again: 2 probe(s), {2 + tries} request(s) handed to Envoy as "
                         f"{SAMPLED_REASON} (the id the kernel made was sampled), at most "
                         f"{TRACE_SAMPLED_TRIES} requests per route")
    assert ok.to_json()["resent"] == 2
    plain = Row("a-0", PROBE, "kernel", "fast", 200)
    assert format_rows([plain])[1].split()[3] == "kernel" and not plain.to_json()["resent"]
