"""`l7fp bench` (also `python -m benchmarks`): run the benchmark and write its results.

Registered in `xds_server.cli.SUBCOMMANDS`; `register()` adds the subparser,
`run()` does the work (heavy imports inside). Needs root: it creates network
namespaces, cgroups and BPF attachments, and removes them before it returns.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

HELP = """\
Compare four configurations side by side on pods in private network namespaces:
  no-mesh     client straight to the app
  sidecar     Istio-like mesh: iptables interception + Envoy sidecars (two per hop)
  sidecar-l4  the sidecar mesh with the app<->sidecar hops bypassed by a sockmap
              (bpf_src/l4_bypass, what merbridge / istio-tcpip-bypass do)
  l7fp        kernel fast path + Envoy slow path (recorded as unavailable, with
              the reason, where the kernel fast path cannot run: not root, no BCC)

Scenarios: leaf (one hop), multihop (client -> frontend -> backend),
policy-mix-0 / -11 / -50 (share of routes that need Envoy), demo (the demo
mesh's /home; not in --quick), sweep (rate sweep with h2load). Closed loop with wrk at 1, 16 and 64 connections (1 and 16
with --quick). Configurations run in ABAB order, repeated; medians reported.

Writes results.json (every run), report.md (tables) and PNG plots to
benchmarks/results/<UTC timestamp>/ unless --out says otherwise. Progress goes
to stderr; Ctrl-C stops cleanly and tears every mesh down.
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("bench", help="benchmark no-mesh / sidecar / sidecar-l4 / l7fp",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="CI mode: one short (1 s) repetition of fewer points, 1-2 minutes "
                        "(most of it compiling the l7fp pods' BPF programs)")
    p.add_argument("--scenario", action="append", metavar="NAME",
                   help="run only this scenario (repeatable): leaf, multihop, policy-mix-0, "
                        "policy-mix-11, policy-mix-50, demo, sweep")
    p.add_argument("--out", type=Path, help="output directory (default benchmarks/results/<timestamp>)")
    p.add_argument("--configurations", default="no-mesh,sidecar,sidecar-l4,l7fp",
                   help="comma-separated subset, in the order they alternate (default: all four)")
    p.add_argument("--repeats", type=int, help="repeats per point (default 3, 1 with --quick)")
    p.add_argument("--duration", type=float, help="seconds per run (default 5, 1 with --quick)")
    p.add_argument("--rates", help="comma-separated offered req/s of the sweep "
                                   "(default 500,1000,2000,4000,8000,16000)")
    p.add_argument("--substrate", choices=["own", "mesh"], default="own",
                   help="where no-mesh/sidecar/sidecar-l4 run: the harness's own pods (default) "
                        "or the local mesh runner (`l7fp mesh`), like l7fp always does")
    p.add_argument("--envoy-concurrency", type=int, default=2,
                   help="worker threads per sidecar Envoy (Istio's default is 2)")


def _rates(text: str | None) -> list[float] | None:
    """--rates as numbers > 0; None when absent or malformed (run() says which)."""
    try:
        rates = [float(r) for r in text.split(",")] if text else None
    except ValueError:
        return None
    return rates if rates is None or all(r > 0 for r in rates) else None


def _bounded(args: argparse.Namespace) -> str | None:
    if args.envoy_concurrency < 1:
        return f"--envoy-concurrency {args.envoy_concurrency}: must be 1 or more"
    if args.repeats is not None and not 1 <= args.repeats <= 20:
        return f"--repeats {args.repeats}: must be 1..20"
    if args.duration is not None and not 0.5 <= args.duration <= 120:
        return f"--duration {args.duration}: must be 0.5..120 seconds"
    return None


def run(args: argparse.Namespace) -> int:
    from benchmarks import configs, plots, report, results, runner, topology
    from benchmarks.plan import build_plan

    problem = _bounded(args)
    names = [n.strip() for n in args.configurations.split(",") if n.strip()]
    bad = [n for n in names if n not in configs.NAMES]
    if bad:
        problem = f"--configurations: unknown {bad[0]!r}; choose from {', '.join(configs.NAMES)}"
    rates = _rates(args.rates)
    if rates is None and args.rates:
        problem = problem or f"--rates {args.rates!r}: expected comma-separated numbers > 0 (req/s)"
    try:
        plan = build_plan(quick=args.quick, scenarios=args.scenario, repeats=args.repeats,
                          duration_s=args.duration, rates=rates)
    except ValueError as exc:
        problem = problem or f"--scenario: {exc}"
    if problem:
        print(f"l7fp bench: {problem}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("l7fp bench: needs root (network namespaces, cgroups, iptables, BPF)", file=sys.stderr)
        return 2
    started = time.time()
    out = args.out or RESULTS / time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    try:  # before any mesh starts: a run must not fail at its end
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"l7fp bench: --out {out}: cannot write there: {exc.filename}: {exc.strerror}",
              file=sys.stderr)
        return 2
    envoy = configs.envoy_path()
    removed = topology.cleanup_stale()
    if removed:
        logging.getLogger(__name__).info("removed leftovers of a crashed run: %s", removed)
    workdir = Path(tempfile.mkdtemp(prefix="l7fp-bench-"))
    mach = results.machine(envoy)
    try:
        outcome = runner.execute(plan, names, envoy=envoy, workdir=workdir,
                                 concurrency=args.envoy_concurrency, substrate=args.substrate)
    finally:
        _remove_run_cgroup()
    doc = results.document(outcome, plan, mach, started)
    doc["plan"]["substrate"] = args.substrate
    results.write(doc, out)
    made = plots.draw_all(doc, out)
    (out / "report.md").write_text(report.render(doc, made))
    ok = [r for r in doc["runs"] if "error" not in r]
    print(f"wrote {out}/results.json, report.md and {len(made)} plot(s): {len(ok)} runs",
          file=sys.stderr)
    if any(r for r in doc["runs"] if "error" in r) or outcome.interrupted or not ok:
        print(f"logs of the pods kept in {workdir}", file=sys.stderr)
        return 130 if outcome.interrupted else 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _remove_run_cgroup() -> None:
    """The per-run cgroup directory, with anything an interrupted teardown left in
    it, then the harness's parent directory when no other run uses it."""
    from benchmarks import cgroups, topology

    try:
        cgroups.remove_tree(cgroups.bench_root() / topology.run_tag())
    except RuntimeError as exc:
        logging.getLogger(__name__).warning("%s", exc)
    try:
        os.rmdir(cgroups.bench_root())
    except OSError:
        pass  # another run's directory is still there, or it is already gone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(parser.parse_args(argv))
    except KeyboardInterrupt:
        return 130
