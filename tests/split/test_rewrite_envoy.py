"""regex_rewrite as the real Envoy 1.40 does it, and the reference model's
kernel forms against it (fastpath/rewrite.py, docs/split.md "Regex path rewrites").

One Envoy, one listener, one virtual host per rewrite (chosen by Host), an
echo upstream that answers with the request target and headers it got.
`test_envoy_regex_rewrite_facts` pins what Envoy does (also for the patterns
that stay ENVOY); `test_reference_model_rewrites_as_envoy` sends
Hypothesis-generated paths and queries through the kernel forms and compares
the path the upstream saw and x-envoy-original-path with the model's decision.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fastpath import envoy_model as em
from fastpath.plan import ClusterAction, Verdict
from fastpath.reference import Request, decide
from tests.split.harness import EnvoyProc, bootstrap_plan, free_ports, http_request

pytestmark = [pytest.mark.envoy]

# host -> (route prefix, pattern, substitution); the kernel forms first
KERNEL_FORMS = {
    "full": ("/", "/.*", "/replaced"),  # istiod's Gateway API ReplaceFullPath
    "foo": ("/foo", "^/foo.*$", "/"),  # corpus: whole path -> constant
    "hub": ("/hub/", "^/hub/(.*)", "/\\1"),  # corpus: strip a literal prefix
    "lit": ("/api", "^/api", "/v2"),
    "grp": ("/a/", "^/a/(.*)$", "/b/c/\\1"),
    "dot": ("/d", ".*", "X"),
    "guard": ("/hu", "^/hub/(.*)", "/\\1"),  # /hub/ not guaranteed: the kernel compares
    "cilium": ("/", "^/foo.*$", "/"),  # corpus (cilium): the same, whole path
    "case": ("/ca", "^/CA(.*)$", "/n\\1"),  # case counts: never matches a /ca path
}
ENVOY_ONLY = {
    "glob": ("/g", "/", "_"),  # every match replaced
    "zero": ("/z", "^/z(.*)$", "\\0-\\1"),
    "empty": ("/e", "^/e.*$", ""),
}
# host -> (route match, prefix_rewrite): the same kernel path (PathRewrite)
PREFIX_FORMS = {
    "pfx": ({"prefix": "/api"}, "/v2"),
    "pci": ({"prefix": "/CI", "case_sensitive": False}, "/ci"),
    "pex": ({"path": "/ex"}, "/exact"),
    "psp": ({"path_separated_prefix": "/ps"}, "/p"),
}


def _bootstrap(port: int, admin: int, up: int) -> dict[str, Any]:
    vhosts = [{"name": host, "domains": [host], "routes": [{
        "name": host, "match": {"prefix": pfx},
        "route": {"cluster": "c0", "timeout": "0s",
                  "regex_rewrite": {"pattern": {"regex": pat}, "substitution": sub}}}]}
        for host, (pfx, pat, sub) in {**KERNEL_FORMS, **ENVOY_ONLY}.items()]
    vhosts += [{"name": host, "domains": [host], "routes": [{
        "name": host, "match": m, "route": {"cluster": "c0", "timeout": "0s", "prefix_rewrite": pr}}]}
        for host, (m, pr) in PREFIX_FORMS.items()]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "l", "address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/" + em.HCM, "stat_prefix": "l",
                        "route_config": {"name": "rc", "virtual_hosts": vhosts},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    }}]}]}],
            "clusters": [{"name": "c0", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
                "cluster_name": "c0", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                    "socket_address": {"address": "127.0.0.1", "port_value": up}}}}]}]}}]}}


@pytest.fixture(scope="module")
def rw_envoy(envoy_bin: str, echo_upstreams: dict[str, int]) -> Iterator[tuple[int, dict[str, Any]]]:
    port, admin = free_ports(2)
    boot = _bootstrap(port, admin, echo_upstreams["c0"])
    e = EnvoyProc(envoy_bin, boot, [port])
    yield port, boot
    e.stop()


def _upstream_saw(port: int, host: str, path: str,
                  headers: dict[str, str] | None = None) -> tuple[str, str | None]:
    """(request target the upstream got, its x-envoy-original-path)."""
    status, _, body = http_request(port, "GET", path, host, headers or {})
    assert status == 200, (host, path, status, body)
    echo = json.loads(body)
    return echo["path"], echo["headers"].get("x-envoy-original-path")


FACTS = [
    # host, path sent, path upstream, x-envoy-original-path
    ("full", "/a/b?x=1&y=/z", "/replaced?x=1&y=/z", "/a/b?x=1&y=/z"),  # query kept aside
    ("foo", "/foobar/x?q", "/?q", "/foobar/x?q"),
    ("hub", "/hub/%2Fa%20b", "/%2Fa%20b", "/hub/%2Fa%20b"),  # no decoding
    ("hub", "/hub/", "/", "/hub/"),
    ("dot", "/d/x?a/b", "X?a/b", "/d/x?a/b"),  # .* once: no empty match at the end
    ("glob", "/g/a/b?c=/d", "_g_a_b?c=/d", "/g/a/b?c=/d"),  # every match, path only
    ("zero", "/z/y", "/z/y-/y", "/z/y"),  # \0 is the whole match
    ("case", "/ca/x", "/ca/x", "/ca/x"),  # no match: unchanged, the header still added
    ("guard", "/hux", "/hux", "/hux"),
    ("empty", "/e/x?q=1", "/e/x?q=1", None),  # an empty result: unchanged, no header
    ("pfx", "/api/x?q=1", "/v2/x?q=1", "/api/x?q=1"),  # prefix_rewrite: the header too
    ("pci", "/cI/a?b", "/ci/a?b", "/cI/a?b"),
    ("pex", "/ex?z", "/exact?z", "/ex?z"),  # an exact match: the whole path
    ("psp", "/ps/x?y", "/p/x?y", "/ps/x?y"),
]


def test_envoy_regex_rewrite_facts(rw_envoy: tuple[int, dict[str, Any]]) -> None:
    port, _ = rw_envoy
    got = [(h, p, *_upstream_saw(port, h, p)) for h, p, _, _ in FACTS]
    assert got == FACTS
    # a client's x-envoy-original-path is overwritten in place (the kernel hands it to Envoy)
    assert _upstream_saw(port, "hub", "/hub/x", {"x-envoy-original-path": "/c"}) == ("/x", "/hub/x")


def test_split_verdicts(rw_envoy: tuple[int, dict[str, Any]]) -> None:
    _, boot = rw_envoy
    plan = bootstrap_plan("rw", boot, executable=False)
    routes = {r.name: r for vh in plan.listeners[0].virtual_hosts for r in vh.routes}
    for host in [*KERNEL_FORMS, *PREFIX_FORMS]:
        r = routes[host]
        assert r.verdict is Verdict.KERNEL, r
        assert isinstance(r.action, ClusterAction)
        assert (r.action.path_rewrite or r.action.prefix_rewrite) is not None
    for host, (_, pat, _) in ENVOY_ONLY.items():
        assert routes[host].verdict is Verdict.ENVOY and repr(pat) in routes[host].reason, routes[host]


_SEG = st.text(alphabet="abcAZ09-._~%2F", min_size=0, max_size=6)
_REST = st.builds(lambda lead, segs, q: lead + "/".join(segs) + (f"?{q}" if q is not None else ""),
                  st.sampled_from(["", "", "b/", "foo", "foo/", "hub/"]), st.lists(_SEG, max_size=3),
                  st.one_of(st.none(), st.text(alphabet="ab=&/?%2F", max_size=8)))


@settings(max_examples=8, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(st.tuples(st.sampled_from(sorted([*KERNEL_FORMS, *PREFIX_FORMS])), _REST),
                    min_size=20, max_size=20))
def test_reference_model_rewrites_as_envoy(rw_envoy: tuple[int, dict[str, Any]],
                                           reqs: list[tuple[str, str]]) -> None:
    port, boot = rw_envoy
    plan = bootstrap_plan("rw", boot, executable=False)
    checked, wrong = 0, []
    for host, rest in reqs:
        lead = KERNEL_FORMS[host][0] if host in KERNEL_FORMS else \
            next(iter(PREFIX_FORMS[host][0].values()))
        path = lead + rest  # the route's prefix, then anything
        d = decide(plan, "l", Request("GET", path, host))
        if d.kind != "forward":
            continue  # the kernel hands it to Envoy (escapes, dot segments), or 404
        seen = _upstream_saw(port, host, path)
        model = (d.path, dict(d.add_headers).get("x-envoy-original-path"))
        checked += 1
        if seen != model:
            wrong.append((host, path, seen, model))
    assert not wrong, wrong
    assert checked > 0
