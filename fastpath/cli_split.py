"""`l7fp split FILE|DIR... [--explain] [--json|--plan]`: verdicts, reasons and coverage.

Registered by `xds_server.cli` (SUBCOMMANDS); owned by the split. Reads Envoy
bootstraps and xDS resource files (see `fastpath.inputs.READERS`), classifies
every route and RBAC rule, and prints what the kernel enforces and what needs
Envoy, with the reason. `--plan` prints the KernelPlans as JSON, one entry per
policy set keyed by `file` and `placement`: an Istio / Gateway API file with
gateway-bound routes has two entries with the same `file` (mesh, gateway).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import sys
from pathlib import Path
from typing import Any

HELP = """\
For each file (directories are searched for *.yaml, *.yml, *.json), print per
listener and route the verdict KERNEL (the eBPF fast path enforces it) or ENVOY
(the sidecar must, because of the feature named in the reason), then the
coverage: the share of routes and of authorization (RBAC) rules enforceable in
the kernel, overall, per placement and per input format, with the denominators.

Istio / Gateway API routes bound only to gateways (placement "gateway") run on
the gateway's Envoy, not on a mesh client's kernel path: their verdict says
what a mesh client's kernel could do, and the coverage counts them as not in
the kernel. Istio / Gateway API verdicts also know the destination pods'
inbound side (a route to pods whose AuthorizationPolicy needs Envoy: ENVOY).

--json prints one object: {"routes": [{file, listener, route_config,
virtual_host, name, verdict, reason, placement}], "rules": [...], "coverage":
{"routes": {kernel, total}, "rules": {kernel, total}, "by_format": {...},
"by_placement": {"mesh": {routes, rules}, "gateway": {...}}}, "files": {...}}
(by_placement counts also have kernel_verdict: the rows with verdict KERNEL).

Exit status: 0; 1 when a FILE named (not found under a DIR) is unusable: not
YAML/JSON, or Envoy would reject it (the line says why), or it holds no policy
L7FP reads (a mesh file, say), or a DIR named has no such file under it; 2 when
a path does not exist.
"""


ASSUME = {
    "timeouts": "enforced route timeouts (built now: the default; kept so scripts still run)",
    "status-retries": "retries on response status (retriable-status-codes, retriable-4xx, "
                      "gRPC status; built now: the default; kept so scripts still run)",
}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("split", help="show which routes/rules the kernel enforces",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="FILE|DIR", help="Envoy bootstraps, xDS resource files, Istio / Gateway API policy files")
    p.add_argument("--explain", action="store_true",
                   help="also print each route's matcher and action, and what the ENVOY rest needs")
    p.add_argument("--json", action="store_true", help="print one JSON object (see above)")
    p.add_argument("--plan", action="store_true",
                   help="print instead a JSON list of {file, plan, placement}: the KernelPlan of "
                   "each policy set (what the BPF side gets); one entry per file and placement "
                   "(an Istio / Gateway API file with gateway-bound routes has two: mesh, gateway)")
    p.add_argument("--assume", action="append", default=[], choices=sorted(ASSUME),
                   help="what-if: classify as if the kernel had this capability (repeatable): "
                   + "; ".join(f"{k}: {v}" for k, v in sorted(ASSUME.items())))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastpath.classify_route import KernelCaps
    from fastpath.coverage import analyse

    # The importer logs every object it skips; `split` reports each of them with
    # its file already ("skipped resource:" / files[].skipped), so not twice.
    logging.getLogger("xds_server.istio").setLevel(logging.ERROR)
    try:
        caps = KernelCaps()  # every --assume capability is built now (the defaults)
        report = analyse(args.paths, caps)
    except FileNotFoundError as e:
        print(f"l7fp split: {e}", file=sys.stderr)
        return 2
    if args.plan:
        json.dump([{"file": p.path, "plan": p.plan.to_json(), "placement": p.placement}
                   for p in report.plans], sys.stdout, indent=1)
        print()
    elif args.json:
        json.dump(report.to_json(), sys.stdout, indent=1)
        print()
    else:
        _print_text(report, args.explain)
    return _status(args.paths, report)


NOTHING_READ = ("no policy in it that L7FP reads (Envoy bootstrap or xDS resources, Istio, "
                "Gateway API, CiliumEnvoyConfig)")


def _status(paths: list[str], report: Any) -> int:
    """1 when a file named on the command line is unusable (Envoy could not run it) or
    holds no policy L7FP reads, or a directory named holds no such file; the files
    found under a directory are a survey: reported, not failed."""
    named = {str(Path(p)) for p in paths if Path(p).is_file()}
    bad = [p for p, info in report.files.items() if p in named and info.get("unusable")]
    for p in bad:
        print(f"l7fp split: {p}: unusable (see above)", file=sys.stderr)
    empty = sorted(named - set(report.files))  # e.g. a mesh file: said, not a silent 0/0
    for p in empty:
        print(f"l7fp split: {p}: {NOTHING_READ}", file=sys.stderr)
    for d in (Path(p) for p in paths if Path(p).is_dir()):
        # compared as paths: under `.` the files are `a.yaml`, not `./a.yaml`
        if not any(Path(f).is_relative_to(d) for f in report.files):
            print(f"l7fp split: {d}: no *.yaml, *.yml or *.json file under it holds a policy "
                  "L7FP reads", file=sys.stderr)
            empty.append(str(d))
    return 1 if bad or empty else 0


def _pct(c: dict[str, int]) -> str:
    share = 100.0 * c["kernel"] / c["total"] if c["total"] else 0.0
    return f"{c['kernel']}/{c['total']} ({share:.1f}%)"


def _print_text(report: Any, explain: bool) -> None:
    plans: dict[str, list[Any]] = {}
    for p in report.plans:
        plans.setdefault(p.path, []).append(p)
    for path, info in report.files.items():
        print(f"== {path} [{', '.join(info['formats']) or 'unknown'}]")
        if info["error"]:
            print(f"   unreadable: {info['error']}")
        for s in info["skipped"]:
            print(f"   skipped resource: {s}")
        for r in info.get("rejected", ()):
            print(f"   invalid: {r}")
        for n in info.get("notes", ()):
            print(f"   note: {n}")
        for o in info.get("opaque", ()):
            print(f"   opaque: {o}")
        for p in plans.get(path, ()):
            if p.placement == "gateway":
                print(f"  {GATEWAY_HEADING}:")
            for lp in p.view.listeners:
                _print_listener(lp, explain)
    cov = report.coverage()
    print(f"\ncoverage: routes {_pct(cov['routes'])}, rules {_pct(cov['rules'])}")
    _print_placement(cov["by_placement"])
    for fmt, b in sorted(cov["by_format"].items()):
        print(f"  {fmt}: routes {_pct(b['routes'])}, rules {_pct(b['rules'])}; files {b['files']}"
              f" (unreadable {b['unreadable_files']}, skipped resources {b['skipped_resources']})")
    if explain:
        print("\nwhat the ENVOY routes/rules need (count of routes/rules per feature):")
        needs = report.needs()
        for feature, n in needs.most_common():
            print(f"  {n:4d}  {feature}")
        gateway = cov["by_placement"]["gateway"]["routes"]["kernel_verdict"]
        if gateway:  # not ENVOY by verdict, yet not run by L7FP's kernel either
            print(f"  {gateway:4d}  KERNEL verdict, but bound to gateways only: the gateway's Envoy runs them")
        if not needs and not gateway:
            print("  none: no route or rule needs Envoy")


GATEWAY_HEADING = ("gateway-bound only (the gateway's Envoy runs these, not L7FP's kernel path; "
                   "verdicts: what a mesh client's kernel path could do)")


def _print_placement(by: dict[str, Any]) -> None:
    """The coverage line's split by placement, saying which figure is which."""
    mesh, gw = by["mesh"], by["gateway"]
    print(f"  mesh (sidecars: L7FP's kernel path): routes {_pct(mesh['routes'])}, "
          f"rules {_pct(mesh['rules'])}")
    n = gw["routes"]["total"]
    if n:
        print(f"  gateway-bound only: routes {n}, run by the gateway's Envoy, none by L7FP's kernel "
              f"(counted as not in the kernel above); {gw['routes']['kernel_verdict']}/{n} have a "
              "KERNEL verdict (a mesh client's kernel path could run them)")


INBOUND_TRACING_NOTE = ("; KERNEL only behind OUTBOUND tracing callers with the same tracer "
                        "whose sampling it keeps, else Envoy (fastpath.inbound_merge.trace_refusal)")


def _tracing(lp: Any) -> str:
    """The " tracing: N/10000 sampled" of a listener with HCM tracing
    (fastpath.tracing); on a KERNEL INBOUND one, which callers may merge it:
    this file's plans do not say who calls it, the agent's view does."""
    n = getattr(lp, "trace_sampling", None)
    if n is None:
        return ""
    inbound = lp.direction.value == "inbound" and lp.verdict.value == "KERNEL"
    return f" tracing: {n}/10000 sampled (the id's version digit){INBOUND_TRACING_NOTE if inbound else ''}"


def _print_listener(lp: Any, explain: bool) -> None:
    print(f"  listener {lp.name} {lp.address}:{lp.port} {lp.direction.value}"
          f" route_config={lp.route_config or '-'} {lp.verdict.value}{_tracing(lp)}")
    for rbac in lp.rbacs or ((lp.rbac,) if lp.rbac else ()):
        print(f"    rbac {rbac.action} {len(rbac.policies)} policies: {rbac.verdict.value}"
              f"{' - ' + rbac.reason if rbac.reason else ''}")
    for vh in lp.virtual_hosts:
        print(f"    vhost {vh.name} {list(vh.domains)}")
        i, guards = 0, []
        for r in vh.routes:
            if r.guard:  # comes right before the route it guards: printed under it
                guards.append(r.reason)
                continue
            print(f"      {r.verdict.value:6s} {r.name or '#' + str(i)}"
                  f"{'  - ' + r.reason if r.reason else ''}")
            for why in guards:
                print(f"             but ENVOY for a {why}")
            i, guards = i + 1, []
            if explain:
                print(f"             match {brief(r.match)}")
                _print_punt(r)
                print(f"             action {brief(r.action)}")


def _print_punt(r: Any) -> None:
    """An ENVOY route whose kernel punt entry evaluates only part of its
    matcher: that part (a request failing it goes on to the later routes)."""
    from fastpath.synth_tables import punt_match

    kept = punt_match(r.match)
    if r.verdict.value == "ENVOY" and kept != r.match:
        print(f"             kernel punt {brief(kept)}")


def brief(value: Any) -> str:
    """A plan value (matcher, action) with only the fields that are set, enums by their
    value: `RouteMatch(path_kind=prefix, path='/')`. The dataclass repr lists every
    default field too (a 300-character line per route that hides what matters)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        parts = [f"{f.name}={brief(getattr(value, f.name))}" for f in dataclasses.fields(value)
                 if not _unset(f, getattr(value, f.name))]
        return f"{type(value).__name__}({', '.join(parts)})"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(brief(v) for v in value) + "]"
    return repr(value)


def _unset(f: dataclasses.Field[Any], value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return bool(value == f.default)
    if f.default_factory is not dataclasses.MISSING:
        return bool(value == f.default_factory())
    return value is None or value == ()
