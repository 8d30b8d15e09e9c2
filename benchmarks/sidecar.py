"""Istio-like sidecar for the benchmark pods: Envoy bootstrap and iptables interception.

Called by `benchmarks.topology` for the `sidecar` and `sidecar-l4`
configurations. The sidecar is a real Envoy with a static bootstrap that does
what an Istio sidecar does on the request path: outbound listener 15001
(original destination, HTTP connection manager, the route table of the
scenario, ORIGINAL_DST cluster), inbound listener 15006 (HTTP connection
manager, to the app on 127.0.0.1). Interception is istio-iptables style: every
outbound TCP connection to 15001 except the sidecar's own (uid 1337) and
loopback, every inbound one to 15006.
"""

from __future__ import annotations

from typing import Any

SIDECAR_UID = 1337
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ADMIN_PORT = 15000
APP_PORT = 8080

ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager")


MIX_SHARES = (0.0, 0.11, 0.5)
# routes per mix service: 0 of 8, 1 of 9 (11 %) and 4 of 8 (50 %) need Envoy; small
# tables, as a service's own route list usually is (and within the 8 routes per
# virtual host of the fast path's built-in decision)
MIX_ROUTES = {0.0: 8, 0.11: 9, 0.5: 8}


def mix_service(share: float) -> str:
    """Service (pod) of one policy mix: mix0, mix11, mix50."""
    return f"mix{round(share * 100)}"


def policy_paths(share: float) -> list[str]:
    """Request paths of one policy mix, one per route: /r0/ .. /r8/.

    The trailing slash keeps prefixes apart (/r1/ is not a prefix of /r10/).
    """
    return [f"/r{i}/" for i in range(MIX_ROUTES[share])]


def envoy_only_indexes(routes: int, share: float) -> set[int]:
    """Which of `routes` routes need Envoy for a given share, spread evenly from the end."""
    count = round(routes * share)
    if count <= 0:
        return set()
    step = routes / count
    return {routes - 1 - int(i * step) for i in range(count)}


def policy_routes(cluster: str, share: float) -> list[dict[str, Any]]:
    """Route table of one mix service, every route to `cluster`.

    A route that "needs Envoy" uses a regex matcher and a request header built
    by a per-request formatter (%DOWNSTREAM_REMOTE_ADDRESS%), things a kernel
    match table cannot do; the others are plain path-prefix routes to one
    cluster with no timeout, which it can.
    """
    table: list[dict[str, Any]] = []
    envoy_only = envoy_only_indexes(MIX_ROUTES[share], share)
    for i, path in enumerate(policy_paths(share)):
        name = f"{mix_service(share)}-r{i}"
        if i in envoy_only:
            table.append({
                "name": f"{name}-envoy",
                "match": {"safe_regex": {"regex": f"^{path}.*$"}},
                "route": {"cluster": cluster},
                "request_headers_to_add": [{"header": {
                    "key": "x-l7fp-peer", "value": "%DOWNSTREAM_REMOTE_ADDRESS%"}}],
            })
        else:
            table.append({
                "name": f"{name}-kernel",
                "match": {"prefix": path},
                # no response timer: a kernel table has none (Envoy's default is 15 s)
                "route": {"cluster": cluster, "timeout": "0s"},
            })
    return table


def default_routes(cluster: str) -> list[dict[str, Any]]:
    return [{"name": "default", "match": {"prefix": "/"},
             "route": {"cluster": cluster, "timeout": "0s"}}]


def hcm(stat_prefix: str, vhosts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": HCM_TYPE, "stat_prefix": stat_prefix,
        "route_config": {"name": stat_prefix, "virtual_hosts": vhosts},
        "http_filters": [ROUTER]}}


def outbound_vhosts(mix_ips: dict[float, str]) -> list[dict[str, Any]]:
    """Per mix service a virtual host (by Host, as Istio does per service), then a catch-all."""
    vhosts = [{"name": mix_service(share), "domains": [f"{ip}:{APP_PORT}", ip],
               "routes": policy_routes("passthrough", share)} for share, ip in mix_ips.items()]
    return [*vhosts, {"name": "default", "domains": ["*"], "routes": default_routes("passthrough")}]


def bootstrap(mix_ips: dict[float, str] | None = None) -> dict[str, Any]:
    """Static Envoy bootstrap of one sidecar (outbound 15001, inbound 15006, admin 15000).

    `mix_ips` maps each policy mix's share to its service address (its virtual host).
    """
    outbound = {
        "name": "outbound",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": OUTBOUND_PORT}},
        "listener_filters": [{"name": "envoy.filters.listener.original_dst", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}],
        "filter_chains": [{"filters": [hcm("outbound", outbound_vhosts(mix_ips or {}))]}],
    }
    inbound = {
        "name": "inbound",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": INBOUND_PORT}},
        "filter_chains": [{"filters": [hcm("inbound", [{"name": "inbound", "domains": ["*"],
                                                         "routes": default_routes("inbound-app")}])]}],
    }
    app = {"socket_address": {"address": "127.0.0.1", "port_value": APP_PORT}}
    clusters = [
        {"name": "passthrough", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
         "connect_timeout": "1s"},
        {"name": "inbound-app", "type": "STATIC", "connect_timeout": "1s",
         "load_assignment": {"cluster_name": "inbound-app", "endpoints": [
             {"lb_endpoints": [{"endpoint": {"address": app}}]}]}},
    ]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ADMIN_PORT}}},
        "static_resources": {"listeners": [outbound, inbound], "clusters": clusters},
    }


def iptables_rules() -> list[list[str]]:
    """istio-iptables-style interception, as `iptables` argument lists for the pod netns."""
    out = "L7FP_BENCH_OUT"
    return [
        ["-t", "nat", "-N", out],
        ["-t", "nat", "-A", out, "-m", "owner", "--uid-owner", str(SIDECAR_UID), "-j", "RETURN"],
        ["-t", "nat", "-A", out, "-d", "127.0.0.0/8", "-j", "RETURN"],
        ["-t", "nat", "-A", out, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(OUTBOUND_PORT)],
        ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", out],
        ["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", str(APP_PORT),
         "-j", "REDIRECT", "--to-ports", str(INBOUND_PORT)],
    ]


def envoy_argv(envoy: str, config_path: str, concurrency: int) -> list[str]:
    """Envoy as uid 1337 (so its own traffic is not intercepted), no hot restart."""
    return ["setpriv", f"--reuid={SIDECAR_UID}", f"--regid={SIDECAR_UID}", "--clear-groups",
            envoy, "-c", config_path, "--concurrency", str(concurrency),
            "--disable-hot-restart", "--log-level", "warn"]
