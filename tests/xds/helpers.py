"""Builders for Envoy resources used across the control-plane tests."""

from __future__ import annotations

from typing import Any

from xds_server import resources as res
from xds_server.ports import pick_free_port

HCM = res.HCM_URL
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def cluster(name: str, port: int = 1, host: str = "127.0.0.1") -> dict[str, Any]:
    return {
        "@type": res.CLUSTER, "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}]},
    }


def eds_cluster(name: str) -> dict[str, Any]:
    return {"@type": res.CLUSTER, "name": name, "type": "EDS", "connect_timeout": "1s",
            "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}}


def endpoints(name: str, port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    return {"@type": res.ENDPOINT, "cluster_name": name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}]}


def listener(name: str, port: int, route_config: str) -> dict[str, Any]:
    return {
        "@type": res.LISTENER, "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "hcm", "typed_config": {
            "@type": HCM, "stat_prefix": name,
            "rds": {"route_config_name": route_config,
                    "config_source": {"ads": {}, "resource_api_version": "V3"}},
            "http_filters": [{"name": "router", "typed_config": {"@type": ROUTER}}],
        }}]}],
    }


def route(prefix: str, cluster_name: str, name: str = "", regex: str | None = None) -> dict[str, Any]:
    match: dict[str, Any] = {"safe_regex": {"regex": regex}} if regex is not None else {"prefix": prefix}
    return {"name": name or cluster_name, "match": match, "route": {"cluster": cluster_name},
            "response_headers_to_add": [{"header": {"key": "x-route", "value": name or cluster_name}}]}


def direct(prefix: str, status: int, name: str) -> dict[str, Any]:
    return {"name": name, "match": {"prefix": prefix}, "direct_response": {"status": status},
            "response_headers_to_add": [{"header": {"key": "x-route", "value": name}}]}


def route_config(name: str, routes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"@type": res.ROUTE, "name": name,
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]}


def messages(*dicts: dict[str, Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for i, d in enumerate(dicts):
        out.setdefault(d["@type"], []).append(res.parse_resource(d, f"resources[{i}]"))
    return out


free_port = pick_free_port  # outside the ephemeral range (xds_server/ports.py)
