"""Coverage: which routes and authorization rules of policy files the kernel enforces.

Called by `fastpath.cli_split` (`l7fp split`); owned by the split. Units follow
the corpus census (/work/shared/corpus/wild/CENSUS.md): a *route* is one Envoy
``routes[]`` entry as seen from one listener (a route config no listener
references counts once, under listener "(no listener)"); a *rule* is one RBAC
policy (an RBAC filter with rules but no policy, allow-nothing, counts once).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from fastpath import inputs
from fastpath.classify_route import KernelCaps
from fastpath.inputs_walk import Listing, walk
from fastpath.plan import KernelPlan, Verdict
from fastpath.split import plan_of, resources_json


@dataclass(frozen=True)
class Row:
    """One route or rule and its verdict (the `--json` item)."""

    file: str
    listener: str
    route_config: str
    virtual_host: str
    name: str
    verdict: str
    reason: str
    placement: str = "mesh"  # "gateway": bound only to gateways (inputs.Document.placement)


class PlanOf(NamedTuple):
    """One policy set's plan: `plan` as the BPF side gets it (`--plan`), `view`
    with the verdicts that know the destinations (fastpath.inbound_verdict;
    the rows' verdicts), `placement` as its Document's."""

    path: str
    plan: KernelPlan
    view: KernelPlan
    placement: str = "mesh"


@dataclass
class Report:
    routes: list[Row]
    rules: list[Row]
    files: dict[str, dict[str, Any]]  # path -> {format, error, skipped}
    plans: list[PlanOf]
    # (digest of an inbound side's canonical JSON, caps) -> its plan: each distinct
    # inbound side (most pods': one port, no policy) parsed and classified once per run
    inbound_plans: dict[tuple[bytes, KernelCaps | None], KernelPlan] = field(
        default_factory=dict, repr=False)

    def coverage(self) -> dict[str, Any]:
        """``{routes: {kernel, total}, rules: {kernel, total}, by_format: {...},
        by_placement: {mesh: ..., gateway: ...}}``: `kernel` counts what L7FP's
        kernel path runs, so a gateway-bound route is never in it (the
        gateway's Envoy runs it); `by_placement` also has `kernel_verdict`,
        the rows whose verdict is KERNEL (what a mesh client's kernel could run)."""
        out: dict[str, Any] = {"routes": _count(self.routes), "rules": _count(self.rules)}
        by: dict[str, Any] = {}
        for info in self.files.values():
            for fmt in info["formats"]:
                b = by.setdefault(fmt, {"files": 0, "unreadable_files": 0, "skipped_resources": 0})
                b["files"] += 1
                b["unreadable_files"] += 1 if info["error"] else 0
                b["skipped_resources"] += len(info["skipped"])
        for fmt, b in by.items():
            b["routes"] = _count([r for r in self.routes if self.files[r.file]["formats"][:1] == [fmt]])
            b["rules"] = _count([r for r in self.rules if self.files[r.file]["formats"][:1] == [fmt]])
        out["by_format"] = by
        out["by_placement"] = {
            where: {kind: {**_count(placed), "kernel_verdict": _verdicts(placed)}
                    for kind, placed in (("routes", [r for r in self.routes if r.placement == where]),
                                         ("rules", [r for r in self.rules if r.placement == where]))}
            for where in ("mesh", "gateway")}
        return out

    def needs(self) -> Counter[str]:
        """How many ENVOY routes/rules each reason accounts for (a row may have several)."""
        c: Counter[str] = Counter()
        for row in self.routes + self.rules:
            if row.verdict == Verdict.ENVOY.value:
                for part in dict.fromkeys(_feature(p) for p in row.reason.split("; ") if p):
                    c[part] += 1
        return c

    def to_json(self) -> dict[str, Any]:
        return {"routes": [asdict(r) for r in self.routes], "rules": [asdict(r) for r in self.rules],
                "coverage": self.coverage(),
                "files": {p: {k: v for k, v in i.items()} for p, i in self.files.items()}}


def _count(rows: list[Row]) -> dict[str, int]:
    """`kernel`: the rows L7FP's kernel path runs (KERNEL, on a sidecar's socket path)."""
    return {"kernel": sum(r.verdict == Verdict.KERNEL.value and r.placement == "mesh" for r in rows),
            "total": len(rows)}


def _verdicts(rows: list[Row]) -> int:
    return sum(r.verdict == Verdict.KERNEL.value for r in rows)


def _feature(reason: str) -> str:
    """The feature named by a reason, without resource names/values (for the histogram)."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "X", reason)
    text = re.sub(r"\d+ms", "Nms", text)
    return text.split(": ", 1)[0] if text.startswith(("route timeout", "regex")) else text


def analyse(paths: list[str], caps: KernelCaps | None = None) -> Report:
    """Read every file under ``paths`` and classify it."""
    from fastpath.inputs_configdir import read_config_dir

    inputs.clear_caches()  # the files as they are now (a process may run several splits)
    report = Report([], [], {}, [])
    # each path walked once; one that does not exist: FileNotFoundError before any work
    listed = [(Path(p), _listing(p)) for p in paths]
    for p, listing in listed:
        for d, why in listing.unreadable:  # said as an unreadable file is
            _analyse_docs(d, [inputs.Document(str(d), "unrecognized", error=why)], report, caps)
        files = listing.files
        whole = read_config_dir(p, files) if p.is_dir() else None
        if whole is not None:  # a `serve --config` directory: one config, as serve reads it
            _analyse_docs(p, [whole], report, caps)
            continue
        for path in files:
            _analyse_docs(path, inputs.read(path), report, caps)
    return report


def _listing(path: str) -> Listing:
    """The files of a path named to `split` (fastpath.inputs_walk for a directory:
    also the directories under it that could not be listed)."""
    p = Path(path)
    return walk(p) if p.is_dir() else Listing(inputs.files([path]))


def _analyse_docs(path: Path, docs: list[inputs.Document], report: Report,
                  caps: KernelCaps | None) -> None:
    info: dict[str, Any] = {"formats": sorted({d.format for d in docs}),
                            "error": "; ".join(d.error for d in docs if d.error) or None,
                            "skipped": [s for d in docs for s in d.skipped],
                            "opaque": [o for d in docs for o in d.opaque],
                            "notes": [n for d in docs for n in d.notes],
                            "rejected": [r for d in docs for r in d.rejected],
                            "unusable": any(d.unusable for d in docs)}
    if not docs:
        return  # not a policy file of any format L7FP reads
    report.files[str(path)] = info
    for doc in docs:
        _unread_rows(str(path), doc, report)
        if doc.error:
            continue
        try:
            plan = plan_of(str(path), resources_json(doc.resources), caps=_caps(caps, doc),
                           orphans=True)
        except Exception as e:  # a resource that parses but can't be classified
            info["error"] = f"cannot classify: {e}"
            continue
        view = _honest(plan, doc, _caps(caps, doc), report.inbound_plans)
        report.plans.append(PlanOf(str(path), plan, view, doc.placement))
        _rows(str(path), view, report, doc.placement)


def _honest(plan: KernelPlan, doc: inputs.Document, caps: KernelCaps | None,
            cache: dict[tuple[bytes, KernelCaps | None], KernelPlan]) -> KernelPlan:
    """`plan` with the verdicts that know the destinations' inbound side
    (fastpath.inbound_verdict.honest_plan, the agent's plan view) when the
    reader knows the destination pods (`Document.inbound_of`: the Istio
    importer); a destination it does not know stays as the plan says."""
    from fastpath.inbound_verdict import honest_plan

    if doc.inbound_of is None:
        return plan
    inbound_of = doc.inbound_of

    def plan_of_ip(ip: str) -> KernelPlan | None:
        res = inbound_of(ip)
        return None if res is None else _inbound_plan(res, caps, cache)

    return honest_plan(plan, plan_of_ip)


def _inbound_plan(res: dict[str, list[dict[str, Any]]], caps: KernelCaps | None,
                  cache: dict[tuple[bytes, KernelCaps | None], KernelPlan]) -> KernelPlan:
    """The plan of one inbound side (Envoy JSON), from `cache` when an equal one was
    classified with the same caps: keyed by content, not by object, so equal sides
    share a plan whoever built them and a freed object's reused id() never hits."""
    key = (hashlib.sha256(json.dumps(res, sort_keys=True).encode()).digest(), caps)
    if key not in cache:
        from xds_server.istio.messages import to_messages
        cache[key] = plan_of("inbound side", resources_json(to_messages(res)), caps=caps)
    return cache[key]


def _caps(caps: KernelCaps | None, doc: inputs.Document) -> KernelCaps | None:
    """The document's runtime layers (fault percentages they may override) and why
    EDS clusters have no endpoints (fastpath.inputs_cilium) in the caps."""
    if not doc.runtime and not doc.eds_missing:
        return caps
    base = caps or KernelCaps()
    if doc.runtime:
        base = replace(base, fault_runtime=doc.runtime)
    return replace(base, eds_missing=tuple(sorted(doc.eds_missing.items())))


def _rows(path: str, plan: KernelPlan, report: Report, placement: str = "mesh") -> None:
    for lp in plan.listeners:
        for vh in lp.virtual_hosts:
            for i, r in enumerate(r for r in vh.routes if not r.guard):
                report.routes.append(Row(path, lp.name, lp.route_config, vh.name, r.name or f"#{i}",
                                         r.verdict.value, r.reason, placement))
        listener_why = lp.reason if lp.verdict is Verdict.ENVOY else ""
        for rbac in lp.rbacs or ((lp.rbac,) if lp.rbac else ()):
            for p in rbac.policies:
                verdict = Verdict.ENVOY if (p.verdict is Verdict.ENVOY or listener_why) else Verdict.KERNEL
                report.rules.append(Row(path, lp.name, lp.route_config, "", f"{rbac.action} {p.name}",
                                        verdict.value, p.reason or listener_why, placement))
            if not rbac.policies:
                report.rules.append(Row(path, lp.name, lp.route_config, "", f"{rbac.action} (no policy)",
                                        Verdict.ENVOY.value if listener_why else Verdict.KERNEL.value,
                                        listener_why, placement))


def _unread_rows(path: str, doc: inputs.Document, report: Report) -> None:
    """ENVOY rows for the routes of listeners/route configs L7FP could not parse.

    Such a resource is still Envoy's to serve (the proto library may lack a
    newer field, an extension may be a contrib build's), so its routes stay in
    the denominator rather than vanishing from it.
    """
    for type_url, raw, why in doc.unread:
        reason = (f"invalid config: {why}" if inputs.em.ENVOY_REJECTS in why
                  else f"not readable by L7FP ({why})")
        if type_url == inputs.em.LISTENER:
            listener = str(raw.get("name", "?")) if isinstance(raw, dict) else "?"
            configs = list(_inline_route_configs(raw))
        else:
            listener, configs = "(no listener)", [raw]
        for rc in configs:
            for vh in _field(rc, "virtual_hosts") or []:
                for i, r in enumerate(_field(vh, "routes") or []):
                    name = r.get("name") if isinstance(r, dict) else None
                    report.routes.append(Row(path, listener, str(_field(rc, "name") or ""),
                                             str(_field(vh, "name") or ""), name or f"#{i}",
                                             Verdict.ENVOY.value, reason, doc.placement))


def _field(obj: Any, snake: str) -> Any:
    """``obj[snake]`` or its camelCase spelling (YAML files use both); None if absent."""
    if not isinstance(obj, dict):
        return None
    head, *rest = snake.split("_")
    return obj.get(snake, obj.get(head + "".join(w.title() for w in rest)))


def _inline_route_configs(listener: Any) -> Any:
    """The inline ``route_config`` of every HttpConnectionManager of a raw listener."""
    chains = list(_field(listener, "filter_chains") or [])
    if _field(listener, "default_filter_chain"):
        chains.append(_field(listener, "default_filter_chain"))
    for chain in chains:
        filters = _field(chain, "filters")
        for f in filters if isinstance(filters, list) else []:
            rc = _field(_field(f, "typed_config"), "route_config")
            if isinstance(rc, dict):
                yield rc
