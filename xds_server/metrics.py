"""Prometheus metrics of one server, named after istiod's `pilot_*` where one exists.

Owned by xds_server.server (one registry per server, so tests can run several
servers in one process); exported by the admin API at /metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from xds_server import resources as res


def short_type(type_url: str) -> str:
    """`cds`, `eds`, ... for the core types (istiod's labels), the message name otherwise."""
    return res.SHORT_NAMES.get(type_url) or type_url.rsplit(".", 1)[-1]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connected = Gauge(
            "pilot_xds", "Number of proxies connected to this server over ADS", ["kind"], registry=r
        )
        self.pushes = Counter(
            "pilot_xds_pushes", "xDS responses sent, by type", ["type"], registry=r
        )
        self.rejects = Counter(
            "pilot_total_xds_rejects", "NACKs received from proxies, by type", ["type"], registry=r
        )
        self.convergence = Histogram(
            "pilot_proxy_convergence_time",
            "Seconds from a config change being seen to the proxy's ACK of it",
            ["type"],
            buckets=(0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30),
            registry=r,
        )
        self.push_triggers = Counter(
            "pilot_push_triggers", "Debounced push batches, by reason", ["reason"], registry=r
        )
        self.config_size = Counter(
            "pilot_xds_config_size_bytes_total", "Bytes of xDS responses sent, by type", ["type"],
            registry=r,
        )
        self.snapshot_rejects = Counter(
            "l7fp_snapshot_rejects", "Snapshots refused before publishing (unresolved references)",
            registry=r,
        )
        self.config_errors = Counter(
            "l7fp_config_errors", "Config reloads refused (bad file)", registry=r,
        )
        self.ignored = Counter(
            "l7fp_xds_ignored_requests", "Requests ignored (stale nonce, unknown type)", ["reason"],
            registry=r,
        )
        self.split_errors = Counter(
            "l7fp_split_errors", "Fast-path split failures (snapshot served unsplit)", registry=r,
        )
