"""The RBAC filter's matcher API against the real Envoy.

Each listener has one RBAC `matcher` (first match wins, LOG lets through, no
match and no on_no_match denies, an empty matcher denies all, `rules` next to
a matcher are ignored, not over an absent header is true, repeated headers are
joined with ","), converted by fastpath.classify_rbac_matcher; every request
the reference model decides must get Envoy's answer (403 or the route's 200).
envoyproxy/examples rbac/envoy.yaml's referer regex, a header regex (full
match of the value) and a case-insensitive contains are walked as DFAs in the
kernel (bpf_src/include/l7fp_dfa.h). tests/kernel_decide/test_rbac_matcher.py
runs the plan in the kernel."""

from __future__ import annotations

import random
import socket
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.plan import KernelPlan, Verdict
from fastpath.reference import Request, decide
from tests.split.harness import EnvoyProc, bootstrap_plan, free_ports

pytestmark = [pytest.mark.envoy]

RBAC_T = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
NET = "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3."


def single(input_type: str, value_match: dict[str, Any], **input_cfg: Any) -> dict[str, Any]:
    return {"singlePredicate": {"input": {"name": "in", "typedConfig": {"@type": input_type, **input_cfg}},
                                "valueMatch": value_match}}


def hdr(name: str, **sm: Any) -> dict[str, Any]:
    return single("type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput", sm,
                  headerName=name)


def act(action: str, name: str = "") -> dict[str, Any]:
    return {"action": {"name": "a", "typedConfig": {"@type": "type.googleapis.com/envoy.config.rbac.v3.Action",
                                                    "name": name or action.lower(), "action": action}}}


def entry(pred: dict[str, Any], action: str) -> dict[str, Any]:
    return {"predicate": pred, "onMatch": act(action)}


def mlist(*entries: dict[str, Any], no_match: str | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"matcherList": {"matchers": list(entries)}}
    if no_match:
        m["onNoMatch"] = act(no_match)
    return {"matcher": m}


NOT = "notMatcher"
A1, B_OK = hdr("x-a", exact="1"), hdr("x-b", prefix="ok")
EXAMPLE_REGEX = {"googleRe2": {}, "regex": "https?://(www.)?envoyproxy.io/docs/envoy.*"}
MATCHERS: dict[str, dict[str, Any]] = {
    "first-match": mlist(entry(A1, "DENY"), entry(B_OK, "ALLOW")),  # no match: deny
    "not-absent": mlist(entry({NOT: A1}, "DENY"), no_match="ALLOW"),
    "joined": mlist(entry(hdr("x-a", exact="1,2"), "ALLOW"), no_match="DENY"),
    "and-not": mlist(entry({"andMatcher": {"predicate": [A1, {NOT: hdr("x-b", suffix="z")}]}}, "ALLOW")),
    "log": mlist(entry(A1, "LOG"), no_match="DENY"),
    "empty": {"matcher": {}},
    "rules-ignored": {"rules": {"action": "ALLOW", "policies": {}}, **mlist(entry(A1, "DENY"), no_match="ALLOW")},
    "allow-then-deny": mlist(entry(B_OK, "ALLOW"), entry({"orMatcher": {"predicate": [
        A1, hdr("x-a", prefix="2")]}}, "DENY"), entry(hdr("x-c", exact="y"), "ALLOW"), no_match="ALLOW"),
    "deny-allow-deny": mlist(entry({NOT: {"orMatcher": {"predicate": [A1, B_OK]}}}, "DENY"),
                             entry(hdr("x-b", suffix="k"), "ALLOW"), entry(A1, "DENY"), no_match="ALLOW"),
    "referer": mlist(entry({NOT: hdr("referer", prefix="https://www.envoyproxy.io/docs/envoy")}, "DENY"),
                     no_match="ALLOW"),
    "port-and-ip": mlist(entry(single(NET + "DirectSourceIPInput", {"exact": "127.0.0.2"}), "DENY"),
                         entry(single(NET + "DestinationPortInput", {"exact": "PORT"}), "ALLOW"),
                         no_match="DENY"),
    "example": mlist(entry({NOT: hdr("referer", safeRegex=EXAMPLE_REGEX)}, "DENY"), no_match="ALLOW"),
    "contains-ic": mlist(entry(hdr("user-agent", contains="safari", ignoreCase=True), "DENY"), no_match="ALLOW"),
    "regex-full": mlist(entry(hdr("x-b", safeRegex={"googleRe2": {}, "regex": "o.?k"}), "ALLOW"),
                        entry(hdr("x-a", safeRegex={"googleRe2": {}, "regex": "[0-9]+"}), "ALLOW"),
                        no_match="DENY"),
}
HEADERS = [(), (("x-a", "1"),), (("x-a", "2"),), (("x-b", "ok"),), (("x-a", "1"), ("x-b", "ok")),
           (("x-a", "1"), ("x-a", "2")), (("x-a", "1"), ("x-b", "az")), (("x-b", "oak"),),
           (("x-c", "y"), ("x-a", "20")), (("referer", "https://www.envoyproxy.io/docs/envoy/latest"),),
           (("referer", "http://envoyproxy.io/docs/envoy"),),
           (("referer", "https://evil.example/docs/envoy"),), (("referer", "https://www.envoyproxy.io/doc"),),
           (("referer", "HTTPS://www.envoyproxy.io/docs/envoy"),), (("referer", "http://wwwXenvoyproxy.io/docs/envoy"),),
           (("user-agent", "Mozilla SAFARI/1"),), (("user-agent", "curl"),), (("x-b", "okay"),),
           (("user-agent", "Safari"), ("user-agent", "x"))]


def rbac_config(name: str, port: int) -> dict[str, Any]:
    cfg = MATCHERS[name]
    if name == "port-and-ip":
        cfg = {"matcher": {**cfg["matcher"]}}
        entries = cfg["matcher"]["matcherList"]["matchers"]
        entries[1]["predicate"]["singlePredicate"]["valueMatch"] = {"exact": str(port)}
    return {"@type": RBAC_T, **cfg}


def bootstrap(ports: list[int], admin: int) -> dict[str, Any]:
    listeners = []
    for name, port in zip(MATCHERS, ports, strict=True):
        hcm = {"@type": "type.googleapis.com/" + em.HCM, "statPrefix": name,
               "routeConfig": {"name": "rc", "virtualHosts": [{"name": "vh", "domains": ["*"], "routes": [
                   {"name": "ok", "match": {"prefix": "/"},
                    "directResponse": {"status": 200, "body": {"inlineString": "ok"}}}]}]},
               "httpFilters": [
                   {"name": "envoy.filters.http.rbac", "typedConfig": rbac_config(name, port)},
                   {"name": "envoy.filters.http.router", "typedConfig": {
                       "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
        listeners.append({"name": name, "address": {"socketAddress": {"address": "127.0.0.1", "portValue": port}},
                          "filterChains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                         "typedConfig": hcm}]}]})
    return {"admin": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": admin}}},
            "staticResources": {"listeners": listeners}}


def plan_from(boot: dict[str, Any]) -> KernelPlan:
    return bootstrap_plan("rbacm", boot)


def raw_request(req: Request) -> bytes:
    lines = [f"{req.method} {req.path} HTTP/1.1", f"Host: {req.host}", *(f"{n}: {v}" for n, v in req.headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def envoy_status(port: int, req: Request) -> int:
    # raw bytes: http.client would not send one header name twice in this order;
    # the client binds req.src_ip (any 127/8 address is local)
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(req.src_ip, 0)) as s:
        s.sendall(raw_request(req))
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


def test_rbac_matcher_agrees_with_envoy(envoy_bin: str) -> None:
    *ports, admin = free_ports(len(MATCHERS) + 1)
    boot = bootstrap(ports, admin)
    plan = plan_from(boot)
    lps = {lp.name: lp for lp in plan.listeners}
    assert all(lp.verdict is Verdict.KERNEL for n, lp in lps.items()), \
        {n: lp.reason for n, lp in lps.items()}
    envoy = EnvoyProc(envoy_bin, boot, ports)
    mismatches, seen = [], {200: 0, 403: 0}
    try:
        for name, port in zip(MATCHERS, ports, strict=True):
            for headers in HEADERS:
                for src in ("127.0.0.1", "127.0.0.2"):
                    req = Request("GET", "/p", "svc", headers, src_ip=src)
                    d = decide(plan, name, req, random.Random(0))
                    assert d.kind != "envoy", (name, req, d)
                    status = envoy_status(port, req)
                    seen[status] = seen.get(status, 0) + 1
                    if status != d.status:
                        mismatches.append(f"{name} {headers}: Envoy {status}, model {d.status}")
    finally:
        envoy.stop()
    assert not mismatches, "\n".join(mismatches)
    assert seen[200] >= 60 and seen[403] >= 60, seen


def test_matcher_shapes_the_kernel_lacks_keep_a_reason() -> None:
    from fastpath.classify_rbac import classify_rbac

    cases = {
        "SourceIPInput (depends on x-forwarded-for)": mlist(
            entry(single(NET + "SourceIPInput", {"exact": "198.18.0.1"}), "DENY"), no_match="ALLOW"),
        "input DestinationPortInput ['prefix']": mlist(
            entry(single(NET + "DestinationPortInput", {"prefix": "80"}), "DENY"), no_match="ALLOW"),
        "matcher_tree": {"matcher": {"matcherTree": {"input": {}}, "onNoMatch": act("ALLOW")}},
        "on_match matcher": {"matcher": {"matcherList": {"matchers": [
            {"predicate": A1, "onMatch": {"matcher": {}}}]}}},
        "custom_match": {"matcher": {"matcherList": {"matchers": [{"predicate": {"singlePredicate": {
            "input": {"typedConfig": {"@type": NET + "DestinationPortInput"}}, "customMatch": {}}},
            "onMatch": act("DENY")}]}}},
        "no small DFA": mlist(entry(hdr("referer", safeRegex={"regex": "(a|b)*a(a|b){7}"}), "DENY"),
                              no_match="ALLOW"),
    }
    for want, cfg in cases.items():
        rbac, why = classify_rbac(cfg)
        assert rbac is not None and rbac.verdict is Verdict.ENVOY and want in "; ".join(why), (want, why)
    # allow-everything matchers enforce nothing; an empty one denies all
    assert classify_rbac(mlist(entry(A1, "LOG"), no_match="ALLOW")) == (None, [])
    rbac, why = classify_rbac({"matcher": {}})
    assert why == [] and rbac is not None and (rbac.action, rbac.policies) == ("ALLOW", ())
