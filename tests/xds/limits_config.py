"""An outbound listener whose route has a local rate limit (LIMIT per hour):
the split makes that route KERNEL, so who enforces the limit depends on the
limiter owner (docs/contracts.md, "Limiter ownership")."""

from __future__ import annotations

from typing import Any

from .helpers import ROUTER, cluster, listener, route, route_config

LIMIT = 3
LRL = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"


def bucket() -> dict[str, Any]:
    return {"@type": LRL, "stat_prefix": "rl",
            "token_bucket": {"max_tokens": LIMIT, "tokens_per_fill": LIMIT, "fill_interval": "3600s"},
            "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}}


def limited(up_port: int, lport: int) -> list[dict[str, Any]]:
    """cluster `one`, listener `out` (port lport, rds `rc`), route `/` limited."""
    lis = listener("out", lport, "rc")
    hcm = lis["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [{"name": "envoy.filters.http.local_ratelimit",
                            "typed_config": {"@type": LRL, "stat_prefix": "rl"}},
                           {"name": "router", "typed_config": {"@type": ROUTER}}]
    r = route("/", "one", "limited")
    del r["response_headers_to_add"]  # keeps the route KERNEL
    r["typed_per_filter_config"] = {"envoy.filters.http.local_ratelimit": bucket()}
    return [cluster("one", up_port), lis, route_config("rc", [r])]
