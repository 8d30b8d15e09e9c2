"""`l7fp mesh audit`: does the kernel really serve every KERNEL route of a running mesh?

Called by mesh/cli.py (`cmd_audit`) and the tests. For every pod of a mesh
running with `--fastpath on`, reads the node's KernelPlan from the control
plane (`/debug/fastpath/plans?proxyID=`), derives one request per KERNEL route
(`fastpath.audit_probe`), sends it from the pod (`mesh.audit_client` in the
pod's netns and cgroup) to the route's listener address (a route of the pod's
inbound listener: from a caller pod to the pod's service, whose kernel decides
that inbound listener too), and reads who served it from the sender's
fast-path counters in `/debug/fastpath` (before/after difference,
fastpath.counters): `fast`/`kernel_reply` = the kernel, `envoy` + reason =
handed to Envoy. One request per route, sequential, each
with a timeout; nothing else is changed (a rate-limited route spends a token,
a route with a fault delay waits). A request the kernel handed to Envoy only
because the id it made was sampled (a Zipkin listener) is sent again, at most
TRACE_SAMPLED_TRIES in all (mesh.audit_verdict.sampled_away).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastpath.audit_probe import NOT_FORWARDED, Probe, inbound_probes, probes
from fastpath.plan import Direction, KernelPlan
from fastpath.plan_json import plan_from_json
from fastpath.tracing import SAMPLED_REASON
from mesh.audit_pod import AuditClientError, PodClient
from mesh.audit_verdict import (
    TRACE_SAMPLED_TRIES,
    after_sampled,
    check_answer,
    check_plan,
    classify,
    sampled_away,
    summary,
)

POOLS_EMPTY = "pools not filled yet"  # after --wait: audited anyway (`pool_empty` shows it)
POOL_WAIT_S = 2.0  # at most this long before each request for the node's pools to refill
# --wait stops early when only pools are empty and stayed so this long (a
# destination that is down); longer than POOL_WAIT_S: the machine is often loaded
POOL_HOLD_S = 5.0
STALE = "datapath runs plan"  # _not_loaded's reason when the versions differ


class AuditError(RuntimeError):
    """The audit cannot run (mesh not running, fast path off, control plane gone); says why."""


@dataclass
class Row:
    """One KERNEL route of one node and what became of its request."""

    pod: str
    probe: Probe
    # "kernel" (the only success), "kernel (other route)", "kernel (wrong status)",
    # "kernel (no answer)", "kernel (other plan)", "ambiguous", "envoy", "unseen" (no counter moved), "skipped", "not loaded"
    served: str
    why: str = ""  # Envoy's reasons, the kernel's outcomes, or why skipped / not loaded
    status: int | None = None
    error: str = ""
    counters: dict[str, int] = field(default_factory=dict)  # "route outcome/reason" -> delta
    via: str = ""  # an inbound route's request: the caller pod that sent it
    # requests before the row's own that the kernel handed to Envoy as trace_sampled
    # (mesh.audit_verdict.sampled_away): the audit sent the probe again after each
    resent: int = 0

    def to_json(self) -> dict[str, Any]:
        req = self.probe.request
        return {"pod": self.pod, "listener": self.probe.listener, "vhost": self.probe.vhost,
                "route": self.probe.route, "verdict": "KERNEL", "served_by": self.served,
                "why": self.why, "status": self.status, "error": self.error,
                "expect": self.probe.expect, "counters": self.counters, "via": self.via,
                "resent": self.resent,
                "request": None if req is None else {
                    "method": req.method, "path": req.path, "host": req.host,
                    "headers": [list(h) for h in req.headers]}}


# ---- the control plane ------------------------------------------------------------
def _get(admin: str, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"http://{admin}{path}", timeout=10) as r:
            body = r.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise AuditError(f"control plane {admin}{path}: HTTP {exc.code}") from None
    except OSError as exc:
        raise AuditError(f"control plane at {admin} does not answer ({exc})") from None
    try:
        return json.loads(body)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise AuditError(f"control plane {admin}{path} answered no JSON: {body[:120]!r}") from None


def _fastpath(admin: str) -> dict[str, Any]:
    dbg = _get(admin, "/debug/fastpath")
    if not dbg or not dbg.get("enabled"):
        raise AuditError(f"the control plane at {admin} runs without the fast-path agent "
                         f"(mode {dbg.get('mode') if dbg else '?'}): nothing to audit")
    return dbg  # type: ignore[no-any-return]


def _node(dbg: dict[str, Any], node_id: str) -> dict[str, Any] | None:
    return next((n for n in dbg.get("nodes", []) if n["node"] == node_id), None)


def _counters(dbg: dict[str, Any], node_id: str) -> Counter[tuple[str, str, str]]:
    node = _node(dbg, node_id) or {}
    return Counter({(c["route"], c["outcome"], c["reason"]): c["requests"]
                    for c in node.get("counters", [])})


def check_state(state: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """The mesh's state, or AuditError when it cannot be audited."""
    if state is None:
        raise AuditError(f"mesh {name!r} is not running (no state file)")
    if state.get("sidecars") == "none" or state.get("xds_mode") == "file" \
            or state.get("fastpath", "off") == "off":
        raise AuditError(f"mesh {name!r} runs with the fast path off (start it with "
                         f"`l7fp mesh up FILE --fastpath on`): nothing to audit")
    return state


def load_plans(state: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, KernelPlan]:
    """pod name -> its node's KernelPlan (pods without a plan left out)."""
    out = {}
    for pod in pods:
        url = f"/debug/fastpath/plans?proxyID={pod['node_id']}"
        got = _get(state["admin"], url)
        if got is None:
            continue
        try:
            out[pod["name"]] = plan_from_json(got["plan"])
        except (KeyError, TypeError, ValueError) as exc:  # PlanJsonError is a ValueError
            raise AuditError(f"the plan of pod {pod['name']} from {state['admin']}{url} is not "
                             f"a KernelPlan: {type(exc).__name__}: {exc}") from None
    return out


def wait_loaded(admin: str, pods: list[dict[str, Any]], plans: dict[str, KernelPlan],
                wait_s: float, hold_s: float = POOL_HOLD_S) -> dict[str, str]:
    """Wait until each pod's datapath runs its plan with filled pools; pod -> why not (left).

    The plan of a pod whose datapath runs another version is read again in
    every turn (`plans` updated in place): right after `mesh up` the control
    plane may push a newer plan than the one read first, and the audit must
    use the plan the datapath runs. Stops early when only pools are still
    empty and have stayed empty `hold_s` (a destination that is down)."""
    deadline = time.monotonic() + wait_s
    empty_since: dict[str, float] = {}
    while True:
        missing = _missing(admin, pods, plans)
        now = time.monotonic()
        if not missing or now >= deadline or pools_settled(missing, empty_since, now, hold_s):
            return missing
        time.sleep(0.5)


def _missing(admin: str, pods: list[dict[str, Any]], plans: dict[str, KernelPlan]) -> dict[str, str]:
    """pod -> why its datapath does not run its plan with filled pools yet; a pod
    whose datapath runs another version gets its plan read again first."""
    dbg = _fastpath(admin)
    missing = {}
    for p in pods:
        if p["name"] not in plans:
            continue
        why = _not_loaded(dbg, p["node_id"], plans[p["name"]])
        if why.startswith(STALE):
            plans.update(load_plans({"admin": admin}, [p]))
            why = _not_loaded(dbg, p["node_id"], plans[p["name"]])
        if why:
            missing[p["name"]] = why
    return missing


def pools_settled(missing: dict[str, str], empty_since: dict[str, float], now: float,
                  hold_s: float = POOL_HOLD_S) -> bool:
    """True when every pod still missing only has empty pools, each pod's for at
    least `hold_s` (the agent refills a pool within about a second when its
    destination answers). `empty_since` (pod -> since when) is kept by the caller."""
    for name in [n for n in empty_since if missing.get(n) != POOLS_EMPTY]:
        del empty_since[name]
    for name, why in missing.items():
        if why == POOLS_EMPTY:
            empty_since.setdefault(name, now)
    return all(why == POOLS_EMPTY and now - empty_since[name] >= hold_s
               for name, why in missing.items())


def _not_loaded(dbg: dict[str, Any], node_id: str, plan: KernelPlan) -> str:
    if node_id in dbg.get("nodes_failed", {}):
        return f"datapath failed: {dbg['nodes_failed'][node_id]}"
    node = _node(dbg, node_id)
    if node is None:
        return "no datapath loaded for this node (yet)"
    # the agent's version of a plan it merged inbound listeners into: "VERSION+in..."
    version = str(node["plan_version"])
    if version != plan.version and not version.startswith(f"{plan.version}+"):
        return f"{STALE} {node['plan_version']}, the control plane's is {plan.version}"
    if any(p.get("free", 0) == 0 for p in node.get("pools", [])):
        return POOLS_EMPTY
    return ""


# ---- the pod side -----------------------------------------------------------------
def target(state: dict[str, Any], probe: Probe) -> tuple[str, int] | None:
    """Where the probe's request goes: the listener's address, or for a wildcard
    listener the VIP of the service its Host names."""
    if probe.address not in ("", "0.0.0.0", "::"):
        return probe.address, probe.port
    assert probe.request is not None
    host = probe.request.host.rsplit(":", 1)[0] if ":" in probe.request.host else probe.request.host
    for svc in state.get("services", []):
        if host in (svc["name"], *svc.get("hostnames", ())) and probe.port in svc["ports"]:
            return svc["vip"], probe.port
    return None


def _job(ip: str, port: int, probe: Probe) -> dict[str, Any]:
    """The pod client's job for the probe's request (mesh.audit_client)."""
    req = probe.request
    assert req is not None
    return {"ip": ip, "port": port, "method": req.method, "target": req.path,
            "headers": [["host", req.host], *[list(h) for h in req.headers]]}


def _pools_refilled(admin: str, node_id: str, dry: set[int],
                    within_s: float = POOL_WAIT_S) -> None:
    """Wait (bounded) until every pool of the node has a free upstream socket: the
    audit's own burst of new connections (one per route) must not empty a pool
    (`pool_empty`) that the agent refills between a real client's requests.
    Pools still empty after the wait go into `dry` and are not waited for again
    (a destination that is down must not cost every later request the wait)."""
    deadline = time.monotonic() + within_s
    while True:
        node = _node(_fastpath(admin), node_id) or {}
        empty = {p["pool"] for p in node.get("pools", []) if p.get("free", 0) == 0} - dry
        if not empty:
            return
        if time.monotonic() >= deadline:
            dry |= empty
            return
        time.sleep(0.1)  # each turn reads all of /debug/fastpath


def audit_pod(state: dict[str, Any], pod: dict[str, Any], plan: KernelPlan,
              timeout: float) -> list[Row]:
    """Send every outbound probe of one pod's plan from that pod; one Row per KERNEL
    route (its inbound routes: `audit_inbound`)."""
    own = probes(plan, src_ip=pod["ip"])
    return send_probes(state, pod, pod["name"], [p for p in own if p.request is not None],
                       timeout) + [Row(pod["name"], p, "skipped", p.skip)
                                   for p in own if p.request is None and not _inbound(p, plan)]


def _inbound(p: Probe, plan: KernelPlan) -> bool:
    return any(lp.name == p.listener and lp.direction is Direction.INBOUND for lp in plan.listeners)


def send_probes(state: dict[str, Any], sender: dict[str, Any], owner: str, todo: list[Probe],
                timeout: float) -> list[Row]:
    """Send each probe from pod `sender`, one Row each for the routes of pod `owner`;
    who served it from the sender's counters."""
    rows, sendable = [], []
    for p in todo:
        dst = target(state, p)
        if dst is None:
            assert p.request is not None
            rows.append(Row(owner, p, "skipped", f"no service of the mesh is {p.request.host!r}"))
        else:
            sendable.append((p, dst))
    if not sendable:
        return rows
    via = "" if sender["name"] == owner else sender["name"]
    dry: set[int] = set()
    client = PodClient(sender)
    try:
        for p, (ip, port) in sendable:
            shown: Counter[str] = Counter()
            sampled = 0  # requests before this one that the kernel handed over as sampled
            while True:
                served, why, got, once = _ask(state["admin"], sender["node_id"], client,
                                              _job(ip, port, p), p, timeout, dry)
                shown.update(once)
                if not sampled_away(served, why) or sampled + 1 == TRACE_SAMPLED_TRIES:
                    break
                sampled += 1
            served, why = after_sampled(served, why, sampled)
            rows.append(Row(owner, p, served, why, got["status"], got["error"], dict(shown), via,
                            sampled))
    except AuditClientError as exc:
        raise AuditError(str(exc)) from None
    finally:
        client.close()
    return rows


def _ask(admin: str, node_id: str, client: PodClient, job: dict[str, Any], p: Probe,
         timeout: float, dry: set[int]) -> tuple[str, str, dict[str, Any], dict[str, int]]:
    """One request of probe `p` from the sender's pod client: (served, why, the
    client's answer, the counters it moved)."""
    _pools_refilled(admin, node_id, dry)
    # read right before the request: traffic during the pool wait is not its
    before = _counters(_fastpath(admin), node_id)
    got = client.ask(job, timeout)
    dbg = _fastpath(admin)
    served, why, shown = classify(p, _counters(dbg, node_id) - before)
    served, why = check_answer(p, served, why, got)
    served, why = check_plan(p, served, why, _node(dbg, node_id))
    return served, why, got, shown


def audit_inbound(state: dict[str, Any], pod: dict[str, Any], plan: KernelPlan,
                  callers: list[dict[str, Any]], plans: dict[str, KernelPlan],
                  timeout: float, unreached: bool = True) -> list[Row]:
    """The KERNEL routes of the pod's inbound listeners, each sent by a caller pod
    (a loaded pod of another service first) through its outbound listener for
    the service address that leads to this pod; Rows for `pod`. `unreached`:
    also rows (skipped) for a port no caller reaches."""
    rows: list[Row] = []
    for port in sorted({lp.port for lp in plan.listeners if lp.direction is Direction.INBOUND}):
        found = _caller_probes(state, pod, port, callers, plans)
        if found is None:
            rows += [Row(pod["name"], p, "skipped", "no sending pod with a loaded datapath has "
                     f"an outbound listener for {pod['name']}:{port}")
                     for p in probes(plan) if p.request is None and _inbound(p, plan)
                     and p.port == port] if unreached else []
            continue
        caller, got = found
        if not unreached and all(p.skip.startswith(NOT_FORWARDED) for p in got):
            continue
        rows += [Row(pod["name"], p, "skipped", p.skip) for p in got if p.request is None]
        rows += send_probes(state, caller, pod["name"], [p for p in got if p.request], timeout)
    return rows


def _caller_probes(state: dict[str, Any], pod: dict[str, Any], port: int,
                   callers: list[dict[str, Any]], plans: dict[str, KernelPlan]
                   ) -> tuple[dict[str, Any], list[Probe]] | None:
    """(caller pod, inbound probes through it) for requests to `pod`:`port`: the
    first caller, in rank order, through which some probe has a request; else
    the first caller with a listener for it (its probes say why skipped)."""
    first = None
    for c, listener in _callers(state, pod, port, callers, plans):
        got = inbound_probes(plans[pod["name"]], port, pod["ip"], plans[c["name"]], listener,
                             c["ip"])
        if any(p.request for p in got):
            return c, got
        first = first or (c, got)
    return first


def _callers(state: dict[str, Any], pod: dict[str, Any], port: int,
             callers: list[dict[str, Any]], plans: dict[str, KernelPlan]
             ) -> Iterator[tuple[dict[str, Any], str]]:
    """(caller pod, its outbound listener) that may reach `pod`:`port`, best first."""
    vips = {s["vip"] for s in state.get("services", [])
            if pod["ip"] in s.get("pod_ips", ()) and port in s["ports"]}
    # another service's pod first, then a replica, then the pod itself (through its service)
    ranked = sorted((c for c in callers if c["name"] in plans),
                    key=lambda c: (c["name"] == pod["name"], c.get("service") == pod.get("service")))
    for c in ranked:
        for lp in plans[c["name"]].listeners:
            if lp.direction is Direction.OUTBOUND and lp.port == port and (
                    lp.address in vips or lp.address in ("0.0.0.0", "::")):
                yield c, lp.name


def run(state: dict[str, Any], sender: str | None = None, wait_s: float = 60.0,
        timeout: float = 5.0, warn: Callable[[str], None] | None = None) -> list[Row]:
    """Audit a running mesh: every pod's outbound KERNEL routes from that pod, and
    every pod's inbound KERNEL routes from a caller pod. With `sender` (a pod, or
    a service: its pod whose datapath runs its plan now, else its first with a
    plan) only what that pod sends: its outbound routes and the inbound routes
    of every pod it reaches (its own too, through its service). `warn` gets a
    line per sending pod the control plane has no plan for (default: stderr)."""
    warn = warn or (lambda msg: print(f"l7fp mesh audit: {msg}", file=sys.stderr))
    _fastpath(state["admin"])
    every = [p for p in state["pods"] if p.get("node_id")]
    plans = load_plans(state, every)
    senders = every if sender is None else [_sender(state, sender, plans)]
    missing = {k: v for k, v in wait_loaded(state["admin"], senders, plans, wait_s).items()
               if v != POOLS_EMPTY}
    # the other pods' plans (their inbound routes) as they are now, after the wait
    plans.update(load_plans(state, [p for p in every if p not in senders]))
    rows: list[Row] = []
    for pod in senders:
        plan = plans.get(pod["name"])
        if plan is None:  # no KERNEL route: said, or an empty table would be all the user sees
            warn(f"no plan for pod {pod['name']} from the control plane ({state['admin']}): "
                 f"nothing it sends is audited")
        elif pod["name"] in missing:
            rows += [Row(pod["name"], p, "skipped", p.skip) if p.request is None else
                     Row(pod["name"], p, "not loaded", missing[pod["name"]])
                     for p in probes(plan, src_ip=pod["ip"]) if not _inbound(p, plan)]
        else:
            rows += audit_pod(state, pod, plan, timeout)
    callers = [p for p in senders if p["name"] in plans and p["name"] not in missing]
    for pod in every:
        if pod["name"] in plans:
            rows += audit_inbound(state, pod, plans[pod["name"]], callers, plans, timeout,
                                  unreached=sender is None)
    return rows


def _sender(state: dict[str, Any], name: str, plans: dict[str, KernelPlan]) -> dict[str, Any]:
    """The pod `--from NAME` sends from: that pod, or of service NAME's pods with a
    sidecar the first whose datapath runs its plan now, else the first with a plan."""
    named = [p for p in state["pods"] if name in (p["name"], p.get("service"))]
    if not named:
        raise AuditError(f"no pod or service {name!r} in mesh {state['name']!r}")
    sidecars = [p for p in named if p.get("node_id")]
    if not sidecars:
        raise AuditError(f"{'pod' if named[0]['name'] == name else 'service'} {name!r} of mesh "
                         f"{state['name']!r} has no sidecar (no xDS node): the fast path "
                         f"decides nothing it sends")
    planned = [p for p in sidecars if p["name"] in plans] or sidecars
    if len(planned) == 1:
        return planned[0]
    missing = wait_loaded(state["admin"], planned, plans, 0)
    return next((p for p in planned if p["name"] not in missing), planned[0])


def format_rows(rows: list[Row]) -> list[str]:
    """The table `l7fp mesh audit` prints, then the summary line."""
    out = [f"{'POD':<16} {'ROUTE (listener/vhost/route)':<60} {'VERDICT':<7} "
           f"{'SERVED BY':<30} STATUS  REQUEST; EXPECTED (the reference model)"]
    for r in rows:
        req = r.probe.request
        what = f"{req.method} {req.path} host {req.host}" + "".join(
            f" {n}: {v}" for n, v in req.headers) if req else ""
        what += f" (from {r.via})" if r.via else ""
        what += f"; expected {r.probe.expect}" if r.probe.expect else ""
        # a kernel row after re-sent probes says so ("fast; N request(s) before it trace_sampled")
        served = "kernel" if r.served == "kernel" and not r.resent else f"{r.served} ({r.why})"
        status = r.error or (str(r.status) if r.status is not None else "-")
        out.append(f"{r.pod:<16} {r.probe.full_name:<60} KERNEL  {served:<30} {status:<7} {what}")
    s = summary(rows)
    out.append(f"KERNEL routes served by the kernel: {s['kernel']} / {s['audited']}"
               + (f" ({s['skipped']} more skipped, no request sent)" if s["skipped"] else ""))
    for why, n in sorted(s["not_kernel"].items()):
        out.append(f"  not by the kernel: {n} x {why}")
    resent = [r for r in rows if r.resent]
    if resent:
        out.append(f"  sent again: {len(resent)} probe(s), {sum(r.resent for r in resent)} "
                   f"request(s) handed to Envoy as {SAMPLED_REASON} (the id the kernel made was "
                   f"sampled), at most {TRACE_SAMPLED_TRIES} requests per route")
    for why, n in sorted(Counter(r.why for r in rows if r.served == "skipped").items()):
        out.append(f"  skipped: {n} x {why}")
    return out
