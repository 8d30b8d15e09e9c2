"""`l7fp serve` plugin (see xds_server.serve): adds --policies/--mesh-file/--k8s.

Called by xds_server.serve while it builds its parser and its sources.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xds_server.sources.base import Source


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Istio import (docs/istio.md)")
    g.add_argument("--policies", metavar="DIR",
                   help="Istio / Gateway API YAML (VirtualService, DestinationRule, "
                        "AuthorizationPolicy, PeerAuthentication, ServiceEntry, Sidecar, HTTPRoute, "
                        "GRPCRoute): generate each sidecar's config the way istiod does")
    g.add_argument("--mesh-file", metavar="FILE",
                   help="services and pods: a local mesh file (docs/mesh.md) or its state.json")
    g.add_argument("--k8s", metavar="DIR",
                   help="services and endpoints from Kubernetes Service/EndpointSlice/Pod YAML")
    g.add_argument("--inbound-address", default="127.0.0.1",
                   help="where a sidecar reaches its own app (default 127.0.0.1)")
    g.add_argument("--capture-ports", default="15001,15006", metavar="OUT,IN",
                   help="ports istio-iptables redirects outbound/inbound traffic to "
                        "(default 15001,15006)")


def make_sources(args: argparse.Namespace) -> list[Source]:
    if not getattr(args, "policies", None):
        for flag in ("mesh_file", "k8s"):
            if getattr(args, flag, None):
                raise SystemExit(f"l7fp serve: --{flag.replace('_', '-')} needs --policies DIR")
        return []
    if getattr(args, "upstream_xds", None):
        raise SystemExit("l7fp serve: --policies and --upstream-xds both generate every sidecar's "
                         "config (same resource names); use one of them")
    from .source import IstioSource

    for flag in ("mesh_file", "k8s"):  # else the error names --policies, not the path given
        value = getattr(args, flag, None)
        if value and not Path(value).exists():
            raise SystemExit(f"l7fp serve: --{flag.replace('_', '-')} {value}: no such file or directory")
    try:
        out_port, in_port = (int(x) for x in str(args.capture_ports).split(","))
        if not (0 < out_port < 65536 and 0 < in_port < 65536):
            raise ValueError
    except ValueError:
        raise SystemExit(f"l7fp serve: --capture-ports {args.capture_ports!r}: expected OUT,IN "
                         "(two ports 1-65535)") from None
    src = IstioSource(args.policies, args.mesh_file, args.k8s, args.inbound_address,
                      capture_ports=(out_port, in_port))
    if not src.load():
        raise SystemExit(f"l7fp serve: {flag_of(args, src.error)}{src.error}")
    return [src]


def flag_of(args: argparse.Namespace, error: str,
            flags: tuple[str, ...] = ("mesh_file", "k8s", "policies")) -> str:
    """`--FLAG ` of the path an importer error starts with (each error names its
    file), among `flags`; also used by `l7fp istio check|config`."""
    for flag in flags:
        value = getattr(args, flag, None)
        if value and error.startswith(str(value)):
            return f"--{flag.replace('_', '-')} "
    return ""
