"""The wild corpus's programs in the kernel: every one passes the verifier, and
the corpus's own plans through l7fp_decide (BPF_PROG_TEST_RUN) equal the
reference model. One file, so both tests share the compiled programs (one
compile per distinct flag set in this process; compiles are most of the time).

Verifier: every plan of every corpus file (`l7fp split`'s reading, gateway
ones too: corpus_sites.read_corpus(programs=True), the same reading as the
differential's) is synthesized, compiled and loaded, and its tables written;
one GET each.

Differential:
The corpus is read as tests/split/test_corpus_differential.py reads it for the
real Envoy (tests/split/corpus_sites.py: `l7fp split`'s per-file step, the
rows' plans): every mesh policy set with a KERNEL route or KERNEL RBAC policy.
Each such plan is synthesized as the agent does (`executable_plan`, then
`synthesize`), its program compiled once per distinct flag set and its tables
loaded; the requests of each listener are the Envoy test's
(corpus_requests.listener_requests), each from the client 127.0.0.1 and from
an address of every source CIDR its RBAC principals name, with several random
draws (ctx->rand, as test_differential.FixedRng gives them to the model).

Rule checked, request by request in one sequence per plan (rate-limit buckets
and round-robin counters carry over in both): when the kernel decides
(FORWARD / REPLY), the model decides the same (route; cluster, endpoint, the
header lines added, no header the route removes present, no host rewrite; or
status and the reply's bytes, a redirect's Location); when the model says
Envoy, the kernel hands over (PASS). The kernel may hand over more only for
test_differential.ALLOWED_EXTRA_PASS's reasons, counted per reason.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from fastpath import bpf_structs as bs
from fastpath.agent_synth import endpoint_order
from fastpath.plan import KernelPlan, ListenerPlan, RbacPolicy, Redirect, Route, Verdict
from fastpath.reference import (
    Decision,
    Request,
    State,
    _policy_matches,
    decide,
    kernel_route,
    location,
)
from fastpath.rewrite import ORIGINAL_PATH
from fastpath.synth import SynthesizedProgram, executable_plan, reply_bytes, synthesize
from kernel_decide.decide_prog import DecideProgram
from kernel_decide.test_differential import ALLOWED_EXTRA_PASS, FixedRng, raw
from tests.split.corpus_requests import listener_requests
from tests.split.corpus_sites import CORPUS, Corpus, Site, read_corpus
from tests.split.test_corpus_differential import unexercised

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

# ctx->rand of each run (x % 100: 0, 33, 99, 95; x % 10^6: 0, 333333, 999999,
# 967295): both sides of 50/50 and 80/20 weights and of fault percentages
DRAWS = (0, 333_333, 999_999, 2**32 - 1)
NOW_NS = 1_000_000  # the clock stays: no bucket refills during the sequence
COMPILE_S: dict[tuple[str, ...], float] = {}  # flag set -> seconds its compile and load took


def program_for(cflags: tuple[str, ...]) -> DecideProgram:
    """DecideProgram.get, timing the compiles (the first get of a flag set)."""
    t = time.monotonic()
    prog = DecideProgram.get(cflags)
    COMPILE_S.setdefault(cflags, time.monotonic() - t)
    return prog


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    """The sites, and every plan's program (the verifier test's)."""
    if not CORPUS.is_dir():
        pytest.skip(f"no corpus at {CORPUS}")
    return read_corpus(programs=True)


def test_every_corpus_program_loads(decide_prog: object, corpus: Corpus) -> None:
    by_flags: dict[tuple[str, ...], list[tuple[str, SynthesizedProgram]]] = {}
    for path, sp in corpus.programs:
        by_flags.setdefault(sp.cflags, []).append((path, sp))
    assert len(corpus.programs) >= 50, "corpus read gave too few plans"
    for cflags, plans in by_flags.items():
        prog = program_for(cflags)  # compile + BPF_PROG_LOAD: the verifier
        assert prog.fd > 0
        for path, sp in plans:
            prog.load(sp)  # every row fits its map
            lid = next(iter(sp.listener_ids.values()))
            d = prog.run(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", listener=lid)
            assert d.verdict in (bs.FORWARD, bs.REPLY, bs.PASS), path
    print(f"verifier: {sum(len(v) for v in by_flags.values())} plans, {len(by_flags)} flag sets")


class KernelRng(FixedRng):
    """FixedRng (randrange: ctx->rand), and the model's weighted endpoint choice
    (random load balancer) made with ctx->rand2 (`x2`): the endpoint whose
    running weight exceeds x2 % total. The kernel takes x2 % n, the same pick
    when the weights are equal."""

    def __init__(self, x: int, x2: int) -> None:
        super().__init__(x)
        self.x2 = x2

    def choices(self, population: Sequence[Any], weights: Sequence[float] | None = None,  # type: ignore[override]
                *, cum_weights: Sequence[float] | None = None, k: int = 1) -> list[Any]:
        ws = [int(w) for w in weights] if weights is not None else [1] * len(population)
        pick = self.x2 % sum(ws)
        for item, w in zip(population, ws, strict=True):
            if pick < w:
                return [item]
            pick -= w
        return [population[-1]]


@dataclass
class Program:
    """One corpus plan as the agent synthesizes it, and its sites (listeners)."""

    plan: KernelPlan  # executable_plan of the sites' plan: synthesized and asked
    sp: SynthesizedProgram
    sites: list[Site]


@dataclass
class Tally:
    compared: int = 0
    decided: Counter[str] = field(default_factory=Counter)  # FORWARD / REPLY
    envoy: int = 0  # the model hands to Envoy, the kernel too
    extra_pass: Counter[str] = field(default_factory=Counter)  # the kernel only: reason
    routes: set[int] = field(default_factory=set)  # id() of routes the kernel decided at
    policies: set[int] = field(default_factory=set)  # id() of policies a decided request matched
    bad: list[str] = field(default_factory=list)


def programs(corpus: Corpus) -> list[Program]:
    by_plan: dict[int, list[Site]] = {}
    for s in corpus.sites:
        by_plan.setdefault(id(s.plan), []).append(s)
    out = []
    for sites in by_plan.values():
        plan = executable_plan(sites[0].plan)
        out.append(Program(plan, synthesize(plan), sites))
    return out


def sources(lp: ListenerPlan) -> list[str]:
    """The Envoy test's client (127.0.0.1) and an address of each IPv4 source
    CIDR the listener's RBAC principals name (the agent sets ctx->src_ip4 to
    the client pod's address)."""
    out = ["127.0.0.1"]
    for rb in lp.rbacs:
        for p in (p for pol in rb.policies for g in pol.principals for p in g if p.source_cidr):
            net = ipaddress.ip_network(p.source_cidr or "", strict=False)
            if net.version == 4:
                out.append(str(net.network_address + (net.num_addresses > 1)))
    return list(dict.fromkeys(out))


def blob_of(sp: SynthesizedProgram, table: str, index: int) -> bytes:
    b = bs.structs(sp.knobs).Blob.from_buffer_copy(sp.rows[table][index])
    return bytes(b.b[:b.len])


def differs(prog: Program, lp: ListenerPlan, req: Request, ref: Decision, d: bs.Decision) -> str:
    """'' when the kernel's FORWARD / REPLY `d` is the model's `ref`, else what differs."""
    sp = prog.sp
    want = kernel_route(lp, req)
    got: Route | None = sp.routes[d.route] if d.route < len(sp.routes) else None
    if ref.kind == "envoy":
        return f"the kernel decides, the model hands to Envoy ({ref.reason})"
    if got is not want:
        return f"route {got.name if got else None!r}, the model's {ref.route!r}"
    if d.verdict == bs.REPLY:
        if ref.kind != "reply" or d.status != ref.status:
            return f"REPLY {d.status}, the model {ref.kind} {ref.status or ref.cluster}"
        if isinstance(getattr(got, "action", None), Redirect):  # the agent's Location (agent_redirect)
            assert got is not None and isinstance(got.action, Redirect)
            loc = location(got.action, got.match, req)
            return "" if loc == ref.location else f"Location {loc!r}, the model's {ref.location!r}"
        full = reply_bytes(ref.status, ref.body, ref.headers)
        expect = full[:full.index(b"\r\n\r\n") + 4] if req.method == "HEAD" else full
        data = blob_of(sp, "l7fp_replies", d.reply)
        return "" if data == expect else f"reply {data!r}, the model's {expect!r}"
    if ref.kind != "forward":
        return f"FORWARD, the model {ref.kind} {ref.status}"
    if d.cluster != sp.cluster_ids[ref.cluster]:
        return f"cluster id {d.cluster}, the model's {ref.cluster!r} ({sp.cluster_ids[ref.cluster]})"
    cluster = prog.plan.cluster(ref.cluster)
    eps = endpoint_order(cluster) if cluster else []
    if d.endpoint >= len(eps) or eps[d.endpoint] != ref.endpoint:
        return f"endpoint #{d.endpoint} of {eps}, the model's {ref.endpoint}"
    if ref.host != req.host:
        return f"the model rewrites the host to {ref.host!r}, the kernel cannot"
    rewrites = d.route in sp.rewrites  # the data path writes the path and its x-envoy-original-path line
    if ref.path != req.path and not rewrites:
        return f"the model rewrites the path to {ref.path!r}, the kernel's route has no rewrite"
    lines = b"".join(f"{n}: {v}\r\n".encode() for n, v in ref.add_headers
                     if not (rewrites and n == ORIGINAL_PATH))
    added = blob_of(sp, "l7fp_hdradds", d.hdr_add - 1) if d.hdr_add else b""
    if added != lines:
        return f"header lines {added!r}, the model's {lines!r}"
    kept = [n for n in ref.remove_headers if req.header(n) is not None]
    return f"forwarded with {kept}, which the route removes" if kept else ""


def run_program(prog: Program, tally: Tally) -> None:
    """Every site's requests, sources and draws in one sequence. After an extra
    PASS (one the model does not share) both sides start afresh: the model's
    filters after the kernel's stop may have taken a token the kernel did not."""
    dp = program_for(prog.sp.cflags)
    dp.load(prog.sp)
    state = State(now_ms=NOW_NS / 1e6)
    for site in prog.sites:
        lp = next(x for x in prog.plan.listeners if x.name == site.lp.name)
        lid = prog.sp.listener_ids[lp.name]
        for req0 in listener_requests(lp, lp.port):
            for src in sources(lp):
                req = replace(req0, src_ip=src)
                for x in DRAWS:
                    ref = decide(prog.plan, lp.name, req, KernelRng(x, x // 3), state)
                    d = dp.run(raw(req.method, req.path, req.host, list(req.headers)), listener=lid,
                               rand=x, rand2=x // 3, now_ns=NOW_NS, src=src)
                    tally.compared += 1
                    verdict = bs.VERDICT_NAMES.get(d.verdict, str(d.verdict))
                    if d.verdict == bs.PASS and ref.kind == "envoy":
                        tally.envoy += 1
                        continue
                    if d.verdict == bs.PASS:
                        why = bs.REASONS[d.reason]
                        tally.extra_pass[why] += 1
                        if why not in ALLOWED_EXTRA_PASS:
                            tally.bad.append(f"{Path(site.file).name} {lp.name} {req} rand={x}\n  "
                                             f"kernel PASS {why}, model {ref}")
                        dp.load(prog.sp)
                        state = State(now_ms=NOW_NS / 1e6)
                        continue
                    why = differs(prog, lp, req, ref, d) if verdict in ("FORWARD", "REPLY") \
                        else f"verdict {verdict}"
                    tally.decided[verdict] += 1
                    if why:
                        tally.bad.append(f"{Path(site.file).name} {lp.name} {req} rand={x}\n  "
                                         f"kernel {verdict} {bs.REASONS[d.reason]}, model {ref}\n  -> {why}")
                    if d.route < len(prog.sp.routes):
                        tally.routes.add(id(prog.sp.routes[d.route]))
                    tally.policies |= {id(pol) for rb in lp.rbacs for pol in rb.policies
                                       if _policy_matches(pol.permissions, pol.principals, req, lp)}


def unmatchable(pol: RbacPolicy, lp: ListenerPlan) -> str:
    """Why no request of this test can match a policy on listener `lp`, or ''."""
    if pol.permissions and all(any(p.port is not None and p.port != lp.port and not p.invert for p in g)
                               for g in pol.permissions):
        return f"permissions need a destination port other than the listener's {lp.port}"
    if pol.principals and all(any(p.authenticated is not None and not p.invert or p.any and p.invert
                                  for p in g) for g in pol.principals):
        return "principals need a peer identity (mTLS), which no plaintext request has"
    return ""


def test_corpus_plans_in_the_kernel_equal_the_model(decide_prog: object, corpus: Corpus) -> None:
    start = time.monotonic()
    progs = programs(corpus)
    fresh = {p.sp.cflags for p in progs} - set(COMPILE_S)  # not compiled by the verifier test
    tally = Tally()
    for p in progs:
        run_program(p, tally)
    claims = [(s, vh, r) for p in progs for s in p.sites
              for lp in p.plan.listeners if lp.name == s.lp.name
              for vh in lp.virtual_hosts for r in vh.routes if r.verdict is Verdict.KERNEL and not r.guard]
    missed = [(f"{Path(s.file).name} {s.lp.name} {r.name}", unexercised(s, vh, r, []))
              for s, vh, r in claims if id(r) not in tally.routes]
    policies = [(s, pol) for p in progs for s in p.sites for lp in p.plan.listeners if lp.name == s.lp.name
                for rb in lp.rbacs if rb.verdict is Verdict.KERNEL
                for pol in rb.policies if pol.verdict is Verdict.KERNEL]
    rules = len(policies) + sum(not rb.policies and rb.verdict is Verdict.KERNEL
                                for p in progs for s in p.sites for lp in p.plan.listeners
                                if lp.name == s.lp.name for rb in lp.rbacs)
    unmatched = [(f"{Path(s.file).name} {pol.name}", unmatchable(pol, s.lp)) for s, pol in policies
                 if id(pol) not in tally.policies]
    times = sorted(COMPILE_S[p.sp.cflags] for p in progs)
    summary = (
        f"corpus in the kernel: {len(progs)} plans, {len(corpus.sites)} listeners; {len({p.sp.cflags for p in progs})} "
        f"programs ({len(fresh)} compiled by this test; compile + load {times[0]:.1f}-{times[-1]:.1f} s each); KERNEL routes "
        f"{len(claims)} of {corpus.kernel_routes} (mesh) run, {len(claims) - len(missed)} decided at by the "
        f"kernel; KERNEL rules {rules} of {corpus.kernel_rules} run, {len(policies) - len(unmatched)} of "
        f"{len(policies)} policies matched by a request the kernel decided; {tally.compared} runs compared: "
        f"kernel decided {sum(tally.decided.values())} {dict(tally.decided)}, both hand to Envoy "
        f"{tally.envoy}, the kernel only {sum(tally.extra_pass.values())} {dict(tally.extra_pass)} "
        f"({time.monotonic() - start:.1f} s)"
        "\n  routes the kernel never decided at:" + "".join(f"\n    {n}: {why or '?'}" for n, why in missed)
        + f"\n  not run: {corpus.not_run}"
        + "\n  policies no decided request matched:" + "".join(f"\n    {n}: {why or '?'}" for n, why in unmatched))
    print(summary)
    assert not tally.bad, f"{len(tally.bad)} disagreements\n" + "\n".join(tally.bad[:8]) + "\n" + summary
    assert len(claims) == corpus.kernel_routes and rules == corpus.kernel_rules and not corpus.not_run, summary
    assert all(why for _, why in missed) and all(why for _, why in unmatched), summary
    assert sum(tally.decided.values()) > tally.compared // 4, summary
