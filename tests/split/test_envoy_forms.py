"""Configs Envoy 1.40 reads that envoy-data-plane does not (xds_server/protojson.py), each a
minimal reproduction of a corpus file (/work/shared/corpus/wild): the split reads them and
gives the honest reason, the residual passes opaque filters to Envoy unchanged, and what
Envoy rejects is an error naming listener and field as Envoy does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from fastpath import envoy_model as em
from fastpath.split import split_snapshot
from xds_server import resources as res
from xds_server.cli import main
from xds_server.protojson import UNKNOWN_TYPE

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
JWT = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
# JwtClaimToHeader.claim_path is newer than envoy-data-plane 2.2 (configs__jwt_authn.yaml)
JWT_NEWER = {"@type": JWT, "providers": {"p": {"issuer": "i", "local_jwks": {"inline_string": "{}"},
                                               "claim_to_headers": [{"header_name": "x-t",
                                                                     "claim_path": [{"key": "t"}]}]}}}


def listener(filters: list[dict[str, Any]], name: str | None = "l", **hcm: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 8080}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": {
            "@type": HCM, "stat_prefix": "s", "http_filters": [*filters, ROUTER],
            "route_config": {"name": "rc", "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]}, **hcm}}]}]}
    if name is not None:
        out["name"] = name
    return out


CLUSTER = {"name": "c", "type": "STATIC", "load_assignment": {"cluster_name": "c", "endpoints": [
    {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                  "port_value": 9}}}}]}]}}


def split_json(tmp_path: Path, lis: dict[str, Any], capsys: pytest.CaptureFixture[str],
               cluster: dict[str, Any] = CLUSTER, status: int = 0) -> dict[str, Any]:
    f = tmp_path / "envoy.yaml"
    f.write_text(yaml.safe_dump({"static_resources": {"listeners": [lis], "clusters": [cluster]}}))
    assert main(["split", "--json", str(f)]) == status
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_one_value_for_a_list_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """single-page-app__envoy.yml: OAuth2Config.pass_through_matcher (a repeated HeaderMatcher)
    given as one mapping; betterproto2 raised "'str' object has no attribute 'items'"."""
    oauth2 = {"name": "envoy.filters.http.oauth2", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.oauth2.v3.OAuth2", "config": {
            "token_endpoint": {"cluster": "c", "uri": "http://h/t", "timeout": "3s"},
            "authorization_endpoint": "http://h/a", "redirect_uri": "http://h/cb",
            "pass_through_matcher": {"name": ":path", "string_match": {"exact": "/login"}},
            "redirect_path_matcher": {"path": {"prefix": "/cb"}}, "signout_path": {"path": {"exact": "/out"}},
            "credentials": {"client_id": "x", "token_secret": {"name": "t"}, "hmac_secret": {"name": "h"}}}}}
    out = split_json(tmp_path, listener([oauth2]), capsys)
    assert [(r["verdict"], r["reason"]) for r in out["routes"]] == [("ENVOY", "http filter oauth2")]
    (info,) = out["files"].values()
    assert info["skipped"] == [] and info["opaque"] == []
    msg = em.parse(em.LISTENER, listener([oauth2]))
    cfg = em.to_json(msg)["filterChains"][0]["filters"][0]["typedConfig"]["httpFilters"][0]["typedConfig"]
    assert cfg["config"]["passThroughMatcher"] == [{"name": ":path", "stringMatch": {"exact": "/login"}}]


def test_typed_config_without_type_is_envoys_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """configs__envoy_ext_authz.yaml: the router's `typed_config: {}`. Envoy 1.40 rejects the
    file ("Didn't find a registered implementation for 'envoy.filters.http.router' with type
    URL: ''"); L7FP says so, naming the (unnamed) listener by its address and the field."""
    lis = listener([], name=None)
    lis["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][-1] = {
        "name": "envoy.filters.http.router", "typed_config": {}}
    with pytest.raises(em.ResourceError) as e:
        em.parse(em.LISTENER, lis)
    assert str(e.value) == (
        "envoy.config.listener.v3.Listener (no name) at 0.0.0.0:8080: filter_chains[0].filters[0]"
        ".typed_config.http_filters[0].typed_config: no @type: Envoy rejects it (\"Didn't find a "
        "registered implementation for 'envoy.filters.http.router' with type URL: ''\")")
    out = split_json(tmp_path, lis, capsys, status=1)  # the file is unusable
    (row,) = out["routes"]
    assert row["verdict"] == "ENVOY" and row["reason"].startswith("invalid config: ")
    assert "Envoy rejects it" in row["reason"]


def test_newer_field_keeps_the_filter_opaque_and_unchanged() -> None:
    """configs__jwt_authn.yaml: a field newer than the library inside a filter L7FP never
    interprets. The listener is read, the route is ENVOY for that filter, and the residual
    carries the filter's config exactly as written (a TypedStruct Envoy resolves itself)."""
    lis = listener([{"name": "envoy.filters.http.jwt_authn", "typed_config": JWT_NEWER}])
    msg, opaque = em.parse_with_notes(em.LISTENER, lis)
    assert [(o.type_name, o.why) for o in opaque] == [
        (JWT.rsplit("/", 1)[-1], "Unknown field 'claim_path' in message JwtClaimToHeader")]
    cl = em.parse(em.CLUSTER, CLUSTER)
    result = split_snapshot("n", {em.LISTENER: [msg], em.CLUSTER: [cl]})
    ((route,),) = [vh.routes for lp in result.plan.listeners for vh in lp.virtual_hosts]
    assert route.reason == "http filter jwt_authn"
    (out,) = result.residual[em.LISTENER]
    tc = em.to_json(type(msg).parse(bytes(out)))["filterChains"][0]["filters"][0]["typedConfig"]
    jwt = tc["httpFilters"][0]["typedConfig"]
    assert jwt == {"@type": "type.googleapis.com/xds.type.v3.TypedStruct", "typeUrl": JWT,
                   "value": {k: v for k, v in JWT_NEWER.items() if k != "@type"}}


def test_unknown_type_is_opaque(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """golang-http__envoy.yaml: a contrib filter type the library lacks."""
    golang = {"name": "envoy.filters.http.golang", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.golang.v3alpha.Config",
        "library_id": "simple", "library_path": "lib/simple.so", "plugin_name": "simple"}}
    out = split_json(tmp_path, listener([golang]), capsys)
    assert [(r["verdict"], r["reason"]) for r in out["routes"]] == [("ENVOY", "http filter golang")]
    (info,) = out["files"].values()
    assert info["opaque"] == ["Listener 'l': filter_chains[0].filters[0].typed_config.http_filters[0]"
                              ".typed_config: envoy.extensions.filters.http.golang.v3alpha.Config kept "
                              f"opaque for Envoy ({UNKNOWN_TYPE})"]


def test_istiod_filters_are_named_by_their_filter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """istiod's sidecar filters (istio-proxy extensions this library lacks) keep
    the route with Envoy, each named so a user finds it in their config: their
    unversioned message names (Config, PluginConfig) say nothing."""
    filters = [{"name": "istio.metadata_exchange", "typed_config": {
                    "@type": "type.googleapis.com/io.istio.http.peer_metadata.Config"}},
               {"name": "istio.stats", "typed_config": {"@type": "type.googleapis.com/stats.PluginConfig"}}]
    out = split_json(tmp_path, listener(filters), capsys)
    assert [(r["verdict"], r["reason"]) for r in out["routes"]] == [
        ("ENVOY", "http filter metadata_exchange; http filter stats")]


def test_opaque_rbac_is_not_interpreted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An RBAC filter with a field the library lacks must not read as "no rules" (allow all):
    its routes are ENVOY, the filter is Envoy's."""
    rbac = {"name": "envoy.filters.http.rbac", "typed_config": {
        "@type": RBAC, "rules": {"action": "DENY", "policies": {"p": {
            "permissions": [{"any": True}], "principals": [{"any": True}]}}}, "newer_knob": 1}}
    out = split_json(tmp_path, listener([rbac]), capsys)
    assert [(r["verdict"], r["reason"]) for r in out["routes"]] == [("ENVOY", "http filter rbac")]
    assert out["rules"] == []


def test_lower_case_enum_stays_readable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`codec_type: auto` (configs__envoy_ext_authz.yaml) next to a one-value list: the HCM is
    read (not made opaque) and the route stays KERNEL."""
    lis = listener([], codec_type="auto")
    lis["filter_chains"][0]["filters"] = lis["filter_chains"][0]["filters"][0]  # one mapping
    out = split_json(tmp_path, lis, capsys)
    assert [r["verdict"] for r in out["routes"]] == ["KERNEL"]
    assert list(out["files"].values())[0]["opaque"] == []


def test_opaque_hcm_and_cluster_options_are_envoys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A newer field in the HttpConnectionManager or in a cluster's protocol options: L7FP
    can't know its effect, so the listener / cluster is Envoy's, with the reason."""
    cluster = {**CLUSTER, "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http_protocol_options": {}}, "newer_knob": True}}}
    out = split_json(tmp_path, listener([], newer_knob=True), capsys, cluster)
    (row,) = out["routes"]  # the HCM's routes are not read, but counted
    assert row["verdict"] == "ENVOY" and row["reason"].startswith("not readable by L7FP (")
    assert "HttpConnectionManager kept opaque for Envoy (Unknown field 'newer_knob'" in row["reason"]
    f = next(iter(out["files"]))
    assert main(["split", "--plan", f]) == 0
    (p,) = json.loads(capsys.readouterr().out)
    (lp,) = p["plan"]["listeners"]
    assert lp["verdict"] == "ENVOY" and "http_connection_manager unknown to L7FP" in lp["reason"]
    (c,) = p["plan"]["clusters"]
    assert c["verdict"] == "ENVOY" and "HttpProtocolOptions unknown to L7FP" in c["reason"]


def test_serve_parser_reads_envoy_forms_and_names_the_field() -> None:
    """`l7fp serve`'s parser (xds_server.resources.parse_resource): the same forms, and one
    ResourceError naming the field (before: an AttributeError traceback)."""
    lis = {"@type": res.LISTENER, **listener([{"name": "envoy.filters.http.jwt_authn", "typed_config": JWT_NEWER}])}
    lis["filter_chains"] = lis["filter_chains"][0]  # one mapping for the list
    msg = res.parse_resource(lis, "resources[0]")
    assert len(msg.filter_chains) == 1
    lis["filter_chains"]["filters"][0]["typed_config"]["http_filters"][1]["typed_config"] = {}
    with pytest.raises(res.ResourceError) as e:
        res.parse_resource(lis, "resources[0]")
    assert e.value.field == ("resources[0].filter_chains[0].filters[0].typed_config.http_filters[1]"
                             ".typed_config")
    assert "'envoy.filters.http.router' with type URL: ''" in e.value.problem
    # a filter named without any typed_config is valid proto, but Envoy 1.40 rejects it too
    lis["filter_chains"]["filters"][0]["typed_config"]["http_filters"][1] = {"name": "envoy.filters.http.router"}
    with pytest.raises(res.ResourceError) as e:
        res.parse_resource(lis, "resources[0]")
    assert e.value.field == "resources[0].filter_chains[0].filters[0].typed_config.http_filters[1]"
    assert e.value.problem.startswith("no typed_config: Envoy rejects it (\"Didn't find a registered")
