"""`l7fp bootstrap`: print an Envoy bootstrap that connects to `l7fp serve` over ADS.

Used by people (`l7fp bootstrap --node-id n1 > b.yaml && envoy -c b.yaml`),
by the demo, the tests and the mesh runner (`bootstrap_config()`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any as AnyT

import yaml

from xds_server.serve import port

# The static cluster Envoy reaches the control plane through: Istio's name, so
# the residual's outlier access logger (fastpath.residual_outlier) finds it in
# L7FP's, the mesh's and istio-proxy's bootstraps alike.
XDS_CLUSTER = "xds-grpc"

HELP = """\
Print an Envoy bootstrap (YAML, or JSON with --json) with ADS over gRPC to the
control plane (state of the world, or incremental with --delta), the node id
and cluster, and the admin port. Example:
  l7fp bootstrap --node-id demo --xds 127.0.0.1:15010 > /tmp/b.yaml
  envoy -c /tmp/b.yaml --use-dynamic-base-id
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bootstrap", help="print an Envoy bootstrap for this control plane",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--node-id", required=True, help="Envoy node id (e.g. sidecar~IP~POD.NS~NS.svc.cluster.local)")
    p.add_argument("--node-cluster", default="", help="Envoy node cluster (default: the node id's service part or 'l7fp')")
    p.add_argument("--xds", default="127.0.0.1:15010", metavar="HOST:PORT",
                   help="control plane address (default 127.0.0.1:15010)")
    p.add_argument("--delta", action="store_true", help="use incremental xDS (DELTA_GRPC)")
    p.add_argument("--admin-port", type=port, default=15000, help="Envoy admin port (default 15000)")
    p.add_argument("--admin-address", default="127.0.0.1", help="Envoy admin address (default 127.0.0.1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p.set_defaults(func=main)


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--xds {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def bootstrap_config(node_id: str, xds: str = "127.0.0.1:15010", *, delta: bool = False,
                     admin_port: int = 15000, admin_address: str = "127.0.0.1",
                     node_cluster: str = "") -> dict[str, AnyT]:
    host, port = parse_hostport(xds)
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    is_ip = host.replace(".", "").isdigit() or ":" in host
    return {
        "node": {"id": node_id, "cluster": node_cluster or _default_cluster(node_id)},
        "admin": {"address": {"socket_address": {"address": admin_address, "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
            },
            "cds_config": ads_source,
            "lds_config": ads_source,
        },
        "static_resources": {"clusters": [{
            "name": XDS_CLUSTER,
            "type": "STATIC" if is_ip else "STRICT_DNS",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {
                        "connection_keepalive": {"interval": "30s", "timeout": "5s"}}},
                },
            },
            "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}]},
        }]},
    }


def _default_cluster(node_id: str) -> str:
    from xds_server.node import parse_istio_id

    ist = parse_istio_id(node_id)
    if ist:
        return f"{ist['pod'].rsplit('-', 1)[0]}.{ist['namespace']}" if ist["namespace"] else ist["pod"]
    return "l7fp"


def main(args: argparse.Namespace) -> int:
    if not args.node_id.strip():  # Envoy refuses the file: "ads: node 'id' and 'cluster' are required"
        print(f"l7fp bootstrap: --node-id {args.node_id!r}: Envoy's ADS needs a node id",
              file=sys.stderr)
        return 2
    try:
        cfg = bootstrap_config(args.node_id, args.xds, delta=args.delta, admin_port=args.admin_port,
                               admin_address=args.admin_address, node_cluster=args.node_cluster)
    except ValueError as exc:
        print(f"l7fp bootstrap: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(cfg, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        yaml.safe_dump(cfg, sys.stdout, sort_keys=False)
    return 0
