"""`l7fp istio`: check Istio YAML and show what a sidecar would get, without serving.

Registered in xds_server.cli SUBCOMMANDS. `l7fp istio check DIR` is to L7FP what
`istioctl analyze` is to istiod (what the importer cannot translate);
`l7fp istio config DIR --node ID` prints a sidecar's generated resources like
`istioctl proxy-config all -o json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

HELP = """\
check:  read Istio / Gateway API YAML (and the services of --mesh-file / --k8s),
        generate every known pod's sidecar config, print one line per untranslated
        field: `KIND NS/NAME: field.path: problem`. Exit 0 when there is none, 1
        when there are warnings, 2 when a file does not load.
        Istio Gateways' servers L7FP does not serve (HTTPS, TLS, TCP) are among them.
config: print the Envoy resources (JSON, by type URL) the proxy NODE_ID gets,
        the same as `l7fp serve --policies` serves before the split; a gateway
        (router~...) with --labels (its pod's, e.g. istio=ingressgateway).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("istio", help="check Istio YAML / show a sidecar's generated config",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="istio_command", metavar="check|config", required=True)
    for name, helptext in (("check", "list what the importer does not translate"),
                           ("config", "print one sidecar's generated Envoy resources")):
        sp = sub.add_parser(name, help=helptext, description=HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("policies", metavar="DIR|FILE", help="Istio / Gateway API YAML")
        sp.add_argument("--mesh-file", metavar="FILE", help="mesh file or its state.json")
        sp.add_argument("--k8s", metavar="DIR", help="Kubernetes Service/EndpointSlice/Pod YAML")
        if name == "config":
            sp.add_argument("--node", required=True, metavar="NODE_ID",
                            help="sidecar~IP~POD.NS~NS.svc.cluster.local (or router~...)")
            sp.add_argument("--labels", default="", metavar="K=V,...",
                            help="the proxy's labels, as its node metadata LABELS says them")
        sp.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from . import generate, load
    from .gateway import istio_gateways
    from .serve_plugin import flag_of

    # The importer logs each warning as it goes; `check` prints each of them as its
    # result (stdout), so a terminal showed every warning twice.
    logging.getLogger("xds_server.istio").setLevel(logging.ERROR)
    for flag in ("mesh_file", "k8s"):  # name the flag, as `l7fp serve` does
        value = getattr(args, flag)
        if value and not Path(value).exists():
            print(f"l7fp istio: --{flag.replace('_', '-')} {value}: no such file or directory",
                  file=sys.stderr)
            return 2
    try:
        mesh = load(args.policies, args.mesh_file, args.k8s)
    except (ValueError, OSError) as exc:
        # the policies are positional: only the flags' files are named by flag
        print(f"l7fp istio: {flag_of(args, str(exc), ('mesh_file', 'k8s'))}{exc}", file=sys.stderr)
        return 2
    if args.istio_command == "config":
        unknown = _unknown_node(mesh, args.node)
        if unknown:
            print(f"l7fp istio: {unknown}", file=sys.stderr)
            return 1
        labels = dict(kv.split("=", 1) for kv in args.labels.split(",") if "=" in kv)
        try:
            json.dump(generate(mesh, args.node, labels), sys.stdout, indent=1)
            sys.stdout.write("\n")
        except BrokenPipeError:  # `| head`
            pass
        return 0
    nodes = [w.node_id for w in mesh.reg.workloads] or [
        "sidecar~198.18.254.1~l7fp-check.default~default.svc.cluster.local"]
    for node in nodes:  # warnings of per-proxy parts (routes, RBAC) appear while generating
        generate(mesh, node)
    for gw in istio_gateways(mesh):  # a gateway its selector picks: its bound routes' warnings
        generate(mesh, f"router~0.0.0.0~{gw.name}.{gw.namespace}~{gw.namespace}.svc.cluster.local",
                 {str(k): str(v) for k, v in (gw.spec.get("selector") or {}).items()})
    _unrouted_hosts(mesh)
    for line in mesh.objs.warnings:
        print(line)
    print(f"{mesh.objs.count()} objects, {len(mesh.reg.services)} services, {len(nodes)} sidecars, "
          f"{len(mesh.objs.warnings)} warnings", file=sys.stderr)
    return 1 if len(mesh.objs.warnings) else 0


def _unknown_node(mesh: object, node: str) -> str | None:
    """Why `--node` names no sidecar of the registry (a typo would otherwise print the
    config of a pod that does not exist, without its inbound policy), or None."""
    from .sidecar import Mesh

    assert isinstance(mesh, Mesh)
    workloads = mesh.reg.workloads
    if not workloads or (node.count("~") == 3 and not node.startswith("sidecar~")):
        return None  # nothing to check against; a gateway (router~...) has no pod here
    if mesh.reg.workload_for_node(node) is not None:
        return None
    known = sorted(w.node_id for w in workloads)
    more = f" (and {len(known) - 3} more)" if len(known) > 3 else ""
    return (f"--node {node!r}: no pod of --mesh-file/--k8s has this IP or POD.NAMESPACE "
            f"(expected sidecar~IP~POD.NS~NS.svc.cluster.local); pods: {', '.join(known[:3])}{more}")


def _unrouted_hosts(mesh: object) -> None:
    """Warn for mesh VirtualServices whose hosts match no service (no route is generated)."""
    import fnmatch

    from .sidecar import Mesh, _virtual_services

    assert isinstance(mesh, Mesh)
    for vs in _virtual_services(mesh):
        for i, host in enumerate(vs.spec.get("hosts") or []):
            fq = mesh.reg.fqdn(str(host), vs.namespace)
            if not any(fq == h or fnmatch.fnmatchcase(h, fq) for h in mesh.reg.services):
                mesh.objs.warnings.add(vs, f"spec.hosts[{i}]", f"{host!r} matches no service of "
                                       "the registry (--mesh-file/--k8s/ServiceEntry); no route")
