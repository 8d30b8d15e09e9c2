"""The wild corpus's listeners the kernel decides, read as `l7fp split` reads them
(tests/split/test_corpus_differential.py).

Each file is read with fastpath.inputs.read and classified with
fastpath.coverage's own per-file step (`_analyse_docs`: plan_of, then the view
with the destinations' inbound side, whose verdicts are the rows'), so the
plans here are the ones `l7fp split` counts. The gateway-bound policy sets
are left out: no L7FP kernel runs them (not in coverage's kernel count).
Files are read in two processes: reading and classifying the corpus is most
of the test's time (betterproto2's to_dict), and CPU-bound. With
`programs=True` (tests/kernel_decide/test_corpus_differential.py) the
gateway-bound sets are classified too and every plan is also synthesized, so
the kernel's verifier test needs no reading of its own.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from fastpath import coverage, inputs
from fastpath.classify import _hcm
from fastpath.plan import KernelPlan, ListenerPlan, Verdict
from fastpath.split import resources_json
from fastpath.synth import SynthesizedProgram, synthesize

CORPUS = Path(os.environ.get("L7FP_CORPUS", "/work/shared/corpus/wild"))
# Listener fields for the original destination (iptables) and the filter chain
# choice: the test's listener has one chain and is reached on its own address
DROP = ("listenerFilters", "useOriginalDst", "bindToPort", "defaultFilterChain", "filterChainMatcher")


@dataclass
class Site:
    """One HCM filter chain of a corpus file that the kernel decides, run as its own listener."""

    file: str
    plan: KernelPlan  # the rows' plan (coverage's view)
    lp: ListenerPlan
    listener: dict[str, Any]  # Envoy JSON: the file's listener with only this chain
    address: str = "127.0.0.1"
    port: int = 0


@dataclass
class Corpus:
    sites: list[Site] = field(default_factory=list)
    clusters: set[str] = field(default_factory=set)  # every cluster name of the sites' files
    kernel_routes: int = 0  # mesh KERNEL route rows (coverage's count)
    kernel_rules: int = 0
    not_run: list[str] = field(default_factory=list)  # KERNEL listeners without a chain to run, with why
    # (file, program) of every plan with a listener, gateway-bound ones too, as
    # the agent synthesizes it (read_corpus(programs=True) only)
    programs: list[tuple[str, SynthesizedProgram]] = field(default_factory=list)

    def add(self, other: Corpus) -> None:
        self.sites += other.sites
        self.clusters |= other.clusters
        self.kernel_routes += other.kernel_routes
        self.kernel_rules += other.kernel_rules
        self.not_run += other.not_run
        self.programs += other.programs


def _chains(raw: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(plan listener name, chain) of each HCM chain of a listener, named as
    fastpath.classify._listener names them."""
    sa = raw.get("address", {}).get("socketAddress", {})
    name = str(raw.get("name", f"{sa.get('address', '0.0.0.0')}:{int(sa.get('portValue', 0))}"))
    chains = list(raw.get("filterChains", [])) + ([raw["defaultFilterChain"]]
                                                   if "defaultFilterChain" in raw else [])
    http = [c for c in chains if _hcm(c) is not None]
    return [(name if len(http) == 1 else f"{name}#{c.get('name', i)}", c) for i, c in enumerate(http)]


def _runnable(raw: dict[str, Any], chain: dict[str, Any], rcs: dict[str, Any]) -> dict[str, Any]:
    """The listener with only `chain`, its route config inline (address set later)."""
    lis = {k: v for k, v in raw.items() if k not in DROP}
    chain = copy.deepcopy(chain)
    chain.pop("filterChainMatch", None)
    hcm = _hcm(chain)
    if hcm is not None and "rds" in hcm:
        hcm["routeConfig"] = rcs[hcm.pop("rds")["routeConfigName"]]
    lis["filterChains"] = [chain]
    return lis


def kernel_parts(lp: ListenerPlan) -> bool:
    """A KERNEL route, or a KERNEL RBAC filter (allow-nothing included: coverage's rule)."""
    return lp.verdict is Verdict.KERNEL and (
        any(r.verdict is Verdict.KERNEL and not r.guard for vh in lp.virtual_hosts for r in vh.routes)
        or any(rb.verdict is Verdict.KERNEL for rb in lp.rbacs))


def read_file(path: Path, programs: bool = False) -> Corpus:
    out = Corpus()
    docs = [d for d in inputs.read(path) if programs or d.placement == "mesh"]
    report = coverage.Report([], [], {}, [])
    coverage._analyse_docs(path, docs, report, None)  # what `l7fp split` runs per file
    out.kernel_routes = sum(r.verdict == Verdict.KERNEL.value and r.placement == "mesh" for r in report.routes)
    out.kernel_rules = sum(r.verdict == Verdict.KERNEL.value and r.placement == "mesh" for r in report.rules)
    usable = [d for d in docs if not d.error]
    if len(usable) != len(report.plans):
        out.not_run.append(f"{path.name}: a policy set was not classified ({report.files})")
        return out
    for doc, po in zip(usable, report.plans, strict=True):
        if programs and po.plan.listeners:
            out.programs.append((str(path), synthesize(po.plan)))
        if po.placement != "mesh":
            continue
        kernel = [lp for lp in po.view.listeners if kernel_parts(lp)]
        if not kernel:
            continue
        res = resources_json(doc.resources)
        chains = {name: (raw, c) for raw in res.listeners for name, c in _chains(raw)}
        for lp in kernel:
            if lp.name not in chains:
                out.not_run.append(f"{path.name} {lp.name}: no HCM chain of that name")
                continue
            raw, chain = chains[lp.name]
            out.sites.append(Site(str(path), po.view, lp, _runnable(raw, chain, res.route_configs)))
        out.clusters |= {str(c.get("name", "")) for c in res.clusters}
    return out


def read_corpus(programs: bool = False) -> Corpus:
    """Every file of the corpus (inputs.files), in order; `programs`: see read_file."""
    out = Corpus()
    files = inputs.files([str(CORPUS)])
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        for one in pool.map(partial(read_file, programs=programs), files, chunksize=4):
            out.add(one)
    return out
