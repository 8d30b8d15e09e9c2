"""Hypothesis strategies: Envoy route tables (snake_case JSON) and requests.

The alphabets are small on purpose, so generated requests often hit the
generated matchers (and the corner cases between them: case, trailing "/",
path-separated prefixes, inverted and absent headers).
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from fastpath.reference import Request

PATHS = ["/", "/a", "/a/", "/a/b", "/ab", "/A/b", "/b", "/a/b/c", "/Ab", "/a/12", "/c/b"]
PREFIXES = ["/", "/a", "/a/", "/ab", "/A", "/b"]
HOSTS = ["h1.example", "x.example", "other.test", "h1.example:8080"]
DOMAINS = [["h1.example"], ["*.example"], ["h1.*"], ["x.example", "h1.example"]]


def _header() -> st.SearchStrategy[dict[str, Any]]:
    name = st.sampled_from(["x-h", "x-k"])
    kind = st.sampled_from(["exact", "prefix", "suffix", "contains", "present", "absent", "regex",
                            "dfa", "authority", "range"])

    def build(n: str, k: str, v: str, inv: bool, ic: bool) -> dict[str, Any]:
        h: dict[str, Any] = {"name": n, "invert_match": inv}
        if k == "authority":  # the kernel does not evaluate it: a punt entry leaves it out
            h["name"] = ":authority"
            h["string_match"] = {"prefix": {"v": "h1", "V": "H1", "vv": "x."}[v], "ignore_case": ic}
        elif k == "range":  # the classifier marks it not evaluable (fastpath.synth_punt)
            h["range_match"] = {"start": "1", "end": "3"}
        elif k == "present":
            h["present_match"] = True
        elif k == "absent":
            h["present_match"] = False
        elif k == "dfa":  # true regexes (a DFA in the kernel): full match of the value
            # (Envoy refuses ignore_case on a safe_regex: "no effect")
            h["string_match"] = {"safe_regex": {"regex": {"v": "v+", "V": "[vV]v?", "vv": "x?v|w"}[v]}}
        elif k == "regex":  # regexes equivalent to exact/prefix/suffix/contains
            h["string_match"] = {"safe_regex": {"regex": {"v": "v", "V": r"V.*", "vv": r".*v"}[v] if not ic
                                                else r".*v.*"}}
        else:
            h["string_match"] = {k: v, "ignore_case": ic}
        return h

    return st.builds(build, name, kind, st.sampled_from(["v", "V", "vv"]), st.booleans(), st.booleans())


def _match() -> st.SearchStrategy[dict[str, Any]]:
    path = st.one_of(
        st.builds(lambda p: {"prefix": p}, st.sampled_from(PREFIXES)),
        st.builds(lambda p: {"path": p}, st.sampled_from(PATHS)),
        st.builds(lambda p: {"path_separated_prefix": p}, st.sampled_from(["/a", "/ab", "/a/b"])),
        st.builds(lambda p: {"safe_regex": {"regex": p}}, st.sampled_from(
            [r"/a/b", r"/a\.b", r"^/ab$", r"/a/.*", r"/A.*",  # literal / prefix
             r"/a/[0-9]+", r"/(a|b)/.*", r"/[^/]+/b", r"/a[bc]?", r"/[a-c]{1,2}(/.*)?"])),  # DFA
    )

    def build(p: dict[str, Any], cs: bool, hs: list[dict[str, Any]], method: str | None,
              q: str | None) -> dict[str, Any]:
        m = dict(p)
        if not cs:
            m["case_sensitive"] = False
        headers = list(hs)
        if method:
            headers.append({"name": ":method", "string_match": {"exact": method}})
        if headers:
            m["headers"] = headers
        if q == "present":
            m["query_parameters"] = [{"name": "q", "present_match": True}]
        elif q:
            m["query_parameters"] = [{"name": "q", "string_match": {"exact": q}}]
        return m

    return st.builds(build, path, st.booleans(), st.lists(_header(), max_size=2),
                     st.sampled_from([None, None, "GET", "POST"]), st.sampled_from([None, None, "1", "present"]))


def _action() -> st.SearchStrategy[dict[str, Any]]:
    cluster = st.sampled_from(["c0", "c1", "c2"])
    forward = st.builds(
        lambda c, rw, host: {"route": {"cluster": c, "timeout": "0s",
                                       **({"prefix_rewrite": rw} if rw else {}),
                                       **({"host_rewrite_literal": host} if host else {})}},
        cluster, st.sampled_from([None, None, "/z", "/z/"]), st.sampled_from([None, None, "up.test"]))
    weighted = st.builds(lambda w: {"route": {"timeout": "0s", "weighted_clusters": {"clusters": [
        {"name": "c1", "weight": w}, {"name": "c2", "weight": 100 - w}]}}}, st.sampled_from([0, 30, 100]))
    direct = st.builds(lambda s, b: {"direct_response": {"status": s, "body": {"inline_string": b}}},
                       st.sampled_from([200, 403, 418, 503]), st.sampled_from(["hello", "no"]))
    redirect = st.builds(lambda r, code: {"redirect": {**r, "response_code": code}}, st.sampled_from([
        {"path_redirect": "/r"}, {"path_redirect": "/new/x", "strip_query": True},
        {"host_redirect": "new.test"}, {"https_redirect": True}, {"port_redirect": 8443},
        {"host_redirect": "new.test", "port_redirect": 81}, {"scheme_redirect": "https", "path_redirect": "/s"},
    ]), st.sampled_from(["MOVED_PERMANENTLY", "FOUND", "SEE_OTHER", "TEMPORARY_REDIRECT", "PERMANENT_REDIRECT"]))
    return st.one_of(forward, forward, weighted, direct, redirect)


FAULT_T = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"


def _route(i: int) -> st.SearchStrategy[dict[str, Any]]:
    def build(m: dict[str, Any], a: dict[str, Any], add: bool, abort: int | None,
              punt: bool) -> dict[str, Any]:
        r = {"name": f"r{i}", "match": m, **a}
        if punt and "route" in r:  # a retry that can fire: a punt entry (ENVOY)
            r["route"] = {**r["route"], "retry_policy": {"retry_on": "envoy-ratelimited", "num_retries": 1}}
        if add and "route" in r:
            r["request_headers_to_add"] = [{"header": {"key": "x-added", "value": f"r{i}"},
                                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
        if abort:  # the listeners of the differential test have a fault filter
            r["typed_per_filter_config"] = {"envoy.filters.http.fault": {"@type": FAULT_T, "abort": {
                "http_status": abort, "percentage": {"numerator": 100}}}}
        return r
    return st.builds(build, _match(), _action(), st.booleans(),
                     st.sampled_from([None, None, None, 503, 418]), st.sampled_from([False, False, True]))


@st.composite
def route_table(draw: Any) -> dict[str, Any]:
    """A RouteConfiguration: a domain-specific vhost and a catch-all, 1-5 routes each."""
    n = draw(st.integers(1, 5))
    routes = [draw(_route(i)) for i in range(n)]
    tail = [draw(_route(10 + i)) for i in range(draw(st.integers(0, 2)))]
    vh0 = {"name": "vh0", "domains": draw(st.sampled_from(DOMAINS)), "routes": routes}
    if draw(st.booleans()):
        vh0["include_request_attempt_count"] = True  # Istio sets it on every vhost
    return {"name": "rc", "virtual_hosts": [
        vh0,
        {"name": "vh1", "domains": ["*"], "routes": tail},
    ]}


def _request(method: str, path: str, q: str, host: str, hs: dict[str, str]) -> Request:
    return Request(method, path + q, host, tuple(sorted(hs.items())))


requests = st.builds(
    _request, st.sampled_from(["GET", "POST"]), st.sampled_from(PATHS),
    st.sampled_from(["", "", "?q=1", "?q=2", "?r=1"]), st.sampled_from(HOSTS),
    st.dictionaries(st.sampled_from(["x-h", "x-k"]), st.sampled_from(["v", "V", "vv", "w", "xv", "2"]),
                    max_size=2),
)


def _permission(port: int) -> st.SearchStrategy[dict[str, Any]]:
    leaf = st.one_of(
        st.just({"any": True}),
        st.builds(lambda k, p: {"url_path": {"path": {k: p}}}, st.sampled_from(["prefix", "exact"]),
                  st.sampled_from(["/a", "/a/b", "/b"])),
        st.builds(lambda p: {"url_path": {"path": {"contains": p}}}, st.sampled_from(["b", "/a"])),
        st.builds(lambda p: {"url_path": {"path": {"safe_regex": {"regex": p}}}},
                  st.sampled_from(["/a/[a-z]+", "/[ab]+", "/a[0-9]*"])),
        st.builds(lambda v: {"header": {"name": "x-h", "string_match": {"safe_regex": {"regex": v}}}},
                  st.sampled_from(["v+", "[vw]v?"])),
        st.builds(lambda m: {"header": {"name": ":method", "string_match": {"exact": m}}},
                  st.sampled_from(["GET", "POST"])),
        st.builds(lambda v: {"header": {"name": "x-h", "string_match": {"exact": v}}}, st.sampled_from(["v", "w"])),
        st.just({"header": {"name": "x-k", "present_match": True}}),
        st.builds(lambda p: {"destination_port": p}, st.sampled_from([port, 1])),
    )
    return st.one_of(
        leaf,
        st.builds(lambda a, b: {"and_rules": {"rules": [a, b]}}, leaf, leaf),
        st.builds(lambda a, b: {"or_rules": {"rules": [a, b]}}, leaf, leaf),
        st.builds(lambda a: {"not_rule": a}, leaf),
    )


def _principal() -> st.SearchStrategy[dict[str, Any]]:
    leaf = st.one_of(
        st.just({"any": True}),
        st.builds(lambda c, n: {"direct_remote_ip": {"address_prefix": c, "prefix_len": n}},
                  st.sampled_from(["127.0.0.0", "198.18.0.0"]), st.sampled_from([8, 15])),
        st.just({"header": {"name": "x-k", "present_match": True}}),
    )
    return st.one_of(leaf, st.builds(lambda a: {"not_id": a}, leaf))


def rbac_config(port: int) -> st.SearchStrategy[dict[str, Any]]:
    """An Envoy RBAC filter config (ALLOW or DENY, 1-3 policies)."""
    policy = st.builds(lambda perms, prins: {"permissions": perms, "principals": prins},
                       st.lists(_permission(port), min_size=1, max_size=2),
                       st.lists(_principal(), min_size=1, max_size=2))
    return st.builds(
        lambda action, pols: {"rules": {"action": action,
                                        "policies": {f"p{i}": p for i, p in enumerate(pols)}}},
        st.sampled_from(["ALLOW", "DENY"]), st.lists(policy, min_size=1, max_size=3))
