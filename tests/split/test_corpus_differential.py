"""Differential test of the wild corpus's KERNEL verdicts against the real Envoy.

Every corpus file is read and classified as `l7fp split` does (tests/split/corpus_sites.py:
fastpath.inputs.read, then fastpath.coverage's own per-file step, so the plans are the rows' plans:
the view with the destinations' inbound side). Each listener (filter chain) of
a mesh policy set that has a KERNEL route or a KERNEL RBAC policy runs, with the
file's own listener, HCM, route table and filters (RDS inlined, bound to
loopback), in one real Envoy: a listener per chain. Every cluster is an echo
upstream that answers with its cluster name. Requests are derived from each
KERNEL route's plan entry and each KERNEL policy's permissions
(tests/split/corpus_requests.py: a hit and near misses); for each one the
reference model's kernel path (decide_datapath) does not hand to Envoy, Envoy's
answer must be one the model allows: status, cluster, forwarded path/host, the
headers the route adds or removes and the ones the kernel path adds, a reply's
body / Location, and RBAC's 403.
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
import selectors
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fastpath.plan import (
    ClusterAction,
    Principal,
    RbacPolicy,
    Route,
    Verdict,
    VirtualHost,
)
from fastpath.reference import (
    Decision,
    QueryUndecidable,
    Request,
    State,
    _policy_matches,
    decide_datapath,
    kernel_route,
)
from tests.istio.harness import Envoy
from tests.split.corpus_requests import listener_requests, route_requests
from tests.split.corpus_sites import CORPUS, Corpus, Site, read_corpus
from tests.split.harness import _handler, free_ports, http_request
from tests.split.test_differential import compare

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

SEEDS = 8  # model draws per request: weighted clusters, fault percentages


class Echoes:
    """An echo upstream per cluster name (tests.split.harness's handler), all
    served by one selector thread; `close()` stops them."""

    def __init__(self, names: set[str]) -> None:
        self.servers = {n: ThreadingHTTPServer(("127.0.0.1", 0), _handler(n)) for n in sorted(names)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def port(self, name: str) -> int:
        return int(self.servers[name].server_address[1])

    def _loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            for srv in self.servers.values():
                sel.register(srv.socket, selectors.EVENT_READ, srv)
            while not self._stop.is_set():
                for key, _ in sel.select(0.2):
                    key.data._handle_request_noblock()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for srv in self.servers.values():
            srv.server_close()


def _bindable(address: str, port: int) -> bool:
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _place(sites: list[Site]) -> list[str]:
    """Addresses and ports: a chain whose RBAC reads the destination port keeps its
    own port (on a loopback address of its own), so Envoy's RBAC sees it; the
    others get free ports. Returns the chains that could not keep theirs."""
    moved = []
    ports = iter(free_ports(len(sites)))
    for i, s in enumerate(sites):
        s.port = next(ports)
        if any(p.port is not None for rb in s.lp.rbacs for pol in rb.policies
               for g in pol.permissions for p in g):
            addr = f"127.77.{i // 250}.{i % 250 + 1}"
            if _bindable(addr, s.lp.port):
                s.address, s.port = addr, s.lp.port
            else:
                moved.append(f"{Path(s.file).name} {s.lp.name}: port {s.lp.port} in use here")
        s.listener = {**s.listener, "name": f"corpus-{i}",
                      "address": {"socketAddress": {"address": s.address, "portValue": s.port}}}
    return moved


def bootstrap(corpus: Corpus, echoes: Echoes) -> dict[str, Any]:
    clusters = [{"name": n, "type": "STATIC", "connectTimeout": "2s", "loadAssignment": {
        "clusterName": n, "endpoints": [{"lbEndpoints": [{"endpoint": {"address": {"socketAddress": {
            "address": "127.0.0.1", "portValue": echoes.port(n)}}}}]}]}} for n in sorted(corpus.clusters)]
    return {"staticResources": {"listeners": [s.listener for s in corpus.sites], "clusters": clusters}}


def allowed(route: Route | None, d: Decision) -> set[str]:
    if route is not None and isinstance(route.action, ClusterAction):
        cs = route.action.clusters
        return {c.name for c in cs if c.weight > 0 or len(cs) == 1}
    return {d.cluster}


def differs(d: Decision, req: Request, route: Route | None, answer: tuple[int, dict[str, str], bytes]) -> str:
    """'' when Envoy's answer is what decision `d` says, else what differs:
    test_differential.compare, then the headers the route removes and the
    kernel path's own lines (x-forwarded-proto, x-request-id, b3)."""
    status, headers, body = answer
    try:
        why = compare(d, req, status, headers, body, allowed(route, d))
    except ValueError:  # JSON: the upstream did not answer, Envoy did
        return f"status {status} {body[:80]!r} from Envoy itself, model forwards to {d.cluster}"
    if why or d.kind != "forward":
        return why
    got = json.loads(body)["headers"]
    for name in d.remove_headers:
        if name in got and name not in {k for k, _ in d.add_headers}:
            return f"header {name} reached the upstream, the route removes it"
    for name in d.hop_removed:
        if name in got:
            return f"hop-by-hop header {name} reached the upstream"
    for name, pattern in d.hcm_added + d.trace_added:
        if not re.fullmatch(pattern, got.get(name, "")):
            return f"header {name}={got.get(name)!r}, the kernel path adds {pattern!r}"
    return ""


@dataclass
class Job:
    """One request the model says the kernel decides, and what it may decide."""

    site: Site
    req: Request
    route: Route | None  # where the kernel stops (reference.kernel_route)
    decisions: list[Decision]  # one per seed


def jobs_of(site: Site) -> tuple[list[Job], int]:
    """The site's requests the kernel decides (in order: the rate-limit buckets
    of its states take them so), and how many it hands to Envoy."""
    jobs, punted = [], 0
    states = [State() for _ in range(SEEDS)]  # one per seed: the rate-limit buckets
    for req in listener_requests(site.lp, site.port):
        try:
            route = kernel_route(site.lp, req)
        except QueryUndecidable:
            punted += 1
            continue
        ds = [decide_datapath(site.plan, site.lp.name, req, random.Random(seed), state)
              for seed, state in enumerate(states)]
        if any(d.kind == "envoy" for d in ds):
            punted += 1
        else:
            jobs.append(Job(site, req, route, ds))
    return jobs, punted


def send(job: Job) -> tuple[int, dict[str, str], bytes]:
    s, req = job.site, job.req
    return http_request(s.port, req.method, req.path, req.host, dict(req.headers), address=s.address,
                        timeout=30)  # a corpus route holds requests 7 s (fault delay)


def refill_ms(site: Site) -> float | None:
    """The time one token takes to come back in the site's buckets (None: no bucket).
    Envoy 1.40 refills continuously from the first token taken (measured: max 2,
    2 per 5 s: a token back 2.5 s after the first request), the model by whole
    intervals, so the two agree on requests sent within this time."""
    limits = [site.lp.local_rate_limit] + [r.rate_limit for vh in site.lp.virtual_hosts for r in vh.routes]
    times = [x.fill_interval_ms / max(x.tokens_per_fill, 1) for x in limits if x is not None]
    return min(times) if times else None


def answers(jobs: list[Job]) -> tuple[list[tuple[Job, Any]], list[str]]:
    """Send every job: those of rate-limited sites first, one at a time, in the
    models' order; then the others at once (fault-delayed ones first).
    Returns (job, answer) and the rate-limited sites whose window passed (not compared)."""
    limited = [j for j in jobs if refill_ms(j.site) is not None]
    rest = sorted((j for j in jobs if refill_ms(j.site) is None),
                  key=lambda j: -max(d.delay_ms for d in j.decisions))
    out, late = [], []
    t0 = time.monotonic()
    window = min((refill_ms(j.site) or 0 for j in limited), default=0.0)
    got = [send(j) for j in limited]
    if (time.monotonic() - t0) * 1000 < window:
        out += list(zip(limited, got, strict=True))
    else:  # a loaded machine: Envoy may have refilled a token the model has not
        late = sorted({f"{Path(j.site.file).name} {j.site.lp.name}" for j in limited})
    with ThreadPoolExecutor(48) as pool:  # every fault-delayed request (7 s) in one round
        out += list(zip(rest, pool.map(send, rest), strict=True))
    return out, late


def unexercised(site: Site, vh: VirtualHost, r: Route, late: list[str]) -> str:
    """Why a KERNEL route was not exercised, or '' (the test fails): its site's
    requests were sent too slowly for the rate limit's window, or its own
    matching request stops at an earlier route (that route takes all it matches)."""
    if f"{Path(site.file).name} {site.lp.name}" in late:
        return "not compared: sending its rate-limited listener's requests outlasted a token's refill"
    hit = route_requests(vh, r, site.port)[0]
    first = kernel_route(site.lp, hit)
    if first is not None and first is not r:
        return f"shadowed by the earlier route {first.name!r}, which takes every request it matches"
    return ""


def unmatchable(pol: RbacPolicy) -> str:
    """Why no request of this test can match an RBAC policy (its principals), or ''."""
    def never(p: Principal) -> str:
        if p.any and p.invert:
            return "an mTLS identity (source principals / namespaces; no TLS here)"
        if p.source_cidr and not p.invert and \
                ipaddress.ip_address("127.0.0.1") not in ipaddress.ip_network(p.source_cidr, strict=False):
            return f"source {p.source_cidr} (the test sends from loopback only)"
        return ""
    whys = [next((w for w in map(never, g) if w), "") for g in pol.principals]
    return "principals need " + " or ".join(sorted(set(whys))) if whys and all(whys) else ""


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    if not CORPUS.is_dir():
        pytest.skip(f"no corpus at {CORPUS}")
    return read_corpus()


@pytest.fixture(scope="module")
def envoy(envoy_bin: str, corpus: Corpus) -> Iterator[list[str]]:
    """One Envoy running every site; yields the sites that could not keep their port."""
    moved = _place(corpus.sites)
    echoes = Echoes(corpus.clusters)
    try:
        admin, = free_ports(1)
        proc = Envoy(envoy_bin, bootstrap(corpus, echoes), admin)
        try:
            yield moved
        finally:
            proc.stop()
            shutil.rmtree(proc.dir, ignore_errors=True)
    finally:
        echoes.close()


def test_corpus_kernel_verdicts_agree_with_envoy(corpus: Corpus, envoy: list[str]) -> None:
    start = time.monotonic()
    jobs: list[Job] = []
    punted = 0
    for site in corpus.sites:
        more, n = jobs_of(site)
        jobs += more
        punted += n
    sent, late = answers(jobs)
    bad, hit_routes, hit_policies = [], set(), set()
    for job, answer in sent:
        whys = [differs(d, job.req, job.route, answer) for d in dict.fromkeys(job.decisions)]
        if all(whys):
            bad.append(f"{Path(job.site.file).name} {job.site.lp.name}\n  {job.req}\n  model "
                       f"{job.decisions[0]}\n  envoy {answer[0]} {answer[2][:160]!r}\n  -> {whys[0]}")
        hit_routes.add(id(job.route))
        hit_policies |= {id(pol) for rb in job.site.lp.rbacs for pol in rb.policies
                         if _policy_matches(pol.permissions, pol.principals, job.req, job.site.lp)}
    claims = [(s, vh, r) for s in corpus.sites for vh in s.lp.virtual_hosts for r in vh.routes
              if r.verdict is Verdict.KERNEL and not r.guard]
    missed = [(f"{Path(s.file).name} {s.lp.name} {r.name}", unexercised(s, vh, r, late))
              for s, vh, r in claims if id(r) not in hit_routes]
    policies = [(s, p) for s in corpus.sites for rb in s.lp.rbacs for p in rb.policies
                if p.verdict is Verdict.KERNEL and rb.verdict is Verdict.KERNEL]
    no_match = [(f"{Path(s.file).name} {p.name}", unmatchable(p)) for s, p in policies
                if id(p) not in hit_policies]
    rules = len(policies) + sum(not rb.policies and rb.verdict is Verdict.KERNEL
                                for s in corpus.sites for rb in s.lp.rbacs)
    summary = (
        f"corpus: {len(corpus.sites)} listeners in one Envoy; KERNEL routes: {len(claims)} of "
        f"{corpus.kernel_routes} (mesh) run, {len(claims) - len(missed)} exercised; KERNEL rules: "
        f"{rules} of {corpus.kernel_rules} run, {len(policies) - len(no_match)} of {len(policies)} "
        f"policies matched by a request (the others only not matched); {len(sent)} requests compared, "
        f"{punted} handed to Envoy by the model ({time.monotonic() - start:.1f} s); Envoy's statuses "
        f"{dict(sorted(Counter(a[0] for _, a in sent).items()))}"
        f"\n  not run: {corpus.not_run}\n  port not kept: {envoy}\n  rate-limit window passed: {late}"
        "\n  routes not exercised:" + "".join(f"\n    {n}: {why or '?'}" for n, why in missed)
        + "\n  policies no request matched:" + "".join(f"\n    {n}: {why or '?'}" for n, why in no_match))
    print(summary)
    assert not bad, f"{len(bad)} disagreements\n" + "\n".join(bad[:8]) + "\n" + summary
    assert len(claims) == corpus.kernel_routes and rules == corpus.kernel_rules and not corpus.not_run, summary
    assert all(why for _, why in missed) and all(why for _, why in no_match), summary
