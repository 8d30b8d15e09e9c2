"""HCM tracing set in the local mesh's policy file (`tracing:` per side,
docs/mesh.md "Tracing"), on both sides of a call, served by the kernel.

`client` calls `user` (an echo app that answers the head it received). The
policy traces `user`'s outbound side (every caller's sidecar) and inbound
side (user's own sidecar) at 30 %, with a route decorator on each. Two meshes,
`--fastpath off` and `on`, side by side (tests/support/onoff.py), get the
same requests on one kept-alive connection. Per request the app sees the
same head both ways, line by line, but the x-request-id, whose version
digit is the caller's decision from the id (9 when its first 8 hex digits
% 10000 < 3000, which the inbound side keeps); no decorator line (the
inbound sidecar takes the caller's off, the merge drops it in the kernel).
With the fast path on, every request is the kernel's
(l7fp_fastpath_requests_total outcome fast on /metrics) and `l7fp mesh
audit --from client` finds its 6 KERNEL routes (client's outbound
listeners for client, user and spans, and the inbound sides they reach:
client's own, user's, spans') served by the kernel.

Then, on the same running mesh, the inbound side samples 60 % (it would
mark ids the caller left unsampled): the merge refuses user's inbound
listener (fastpath.inbound_merge.trace_refusal), /debug/fastpath says why,
the requests go to Envoy, and the app gets the inbound sidecar's decision
(r < 6000).

Last, on the same mesh, both of user's sides at 30 % again with the Zipkin
provider, whose collector is the mesh's `spans` service (mesh.apps.spans):
80 requests on one connection. Per request, from the head the app got:
unsampled (digit 4, x-b3-sampled 0), the kernel's (outcome fast, the answer
straight from the app) and no span with its x-b3-traceid at the collector;
sampled (digit 9, x-b3-sampled 1), handed to Envoy (`envoy/trace_sampled`)
and exactly a CLIENT span of client.mt and a SERVER span of user.mt with its
trace id. The counts add up to the requests sent, both samples are seen, the
collector's trace ids are exactly the sampled ones, and both sidecars'
tracing.zipkin reports_dropped and reports_failed are 0. The spans' own
outbound side traces with Zipkin at 0 % from the start (POLICY), so every
node is built with Zipkin once: the switch re-applies plans, compiles
nothing. Before each switch's requests the sidecars run the new listeners
and no old filter chain drains (`sidecar_lag`).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fastpath.tracing import version_digit
from mesh.ready import client_node, fastpath_debug
from mesh.runner import envoy_stats, sidecar_admin

pytestmark = [pytest.mark.kernel, pytest.mark.mesh, pytest.mark.envoy, pytest.mark.slow,
              pytest.mark.timeout(240)]

HERE = Path(__file__).resolve().parent
APP = HERE.parent / "kernel_differential" / "echo_app.py"  # answers the head it received
DRIVER = HERE.parent / "kernel_differential" / "driver.py"
sys.path.insert(0, str(HERE.parent / "kernel_differential"))
from test_fastpath_onoff import fastpath_counts  # noqa: E402

from tests.support.onoff import both_modes  # noqa: E402

MESH = """
namespace: mt
policies: policies.yaml
services:
  client:
    command: ["${PYTHON}", "@APP@", --port, "8080", --log-dir, "@LOGDIR@"]
    ports: [8080]
    calls: [user]
  user:
    command: ["${PYTHON}", "@APP@", --port, "9000", --log-dir, "@LOGDIR@"]
    ports: [9000]
  spans:
    command: ["${PYTHON}", -m, mesh.apps.spans, --port, "9411"]
    ports: [9411]
"""
POLICY = """
# client's own inbound side is not transparent (a header add): the client's node
# merges it, so -DDP_INBOUND stays compiled in when user's inbound side is
# refused, and the refusal is a plan apply (milliseconds), not a second compile.
# The collector's own outbound side traces with Zipkin at 0 % (no request is
# sampled, nothing reported): every node's program has -DDP_TRACE_ZIPKIN=1 from
# the start, so the Zipkin phase's switch is a plan apply too, not a rebuild
# (its compile took ~14 s wall on the loaded 2 cores)
spans:
  outbound:
    tracing: {random_sampling: {value: 0}@ZIPKIN@}
client:
  inbound:
    routes:
    - match: {prefix: /}
      request_headers_to_add: [{header: {key: x-mt-in, value: client}}]
user:
  outbound:
    tracing: {random_sampling: {value: 30}@PROVIDER@}
    routes:
    - name: user-call
      match: {prefix: /}
      decorator: {operation: user-call}
  inbound:
    tracing: {random_sampling: {value: @INBOUND@}@PROVIDER@}
    routes:
    - name: user-serve
      match: {prefix: /}
      decorator: {operation: user-serve}
"""
# the Zipkin provider (spans' outbound side from the start, user's sides in the
# Zipkin phase): the collector is the mesh's spans service
ZIPKIN_TRACER = "envoy.tracers.zipkin"
ZIPKIN = (', provider: {name: ' + ZIPKIN_TRACER + ', typed_config: {'
          '"@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig, collector_cluster: spans, '
          'collector_endpoint: /api/v2/spans, collector_endpoint_version: HTTP_JSON}}')
SAMPLING = 3000  # the caller's random_sampling 30 %, as 10000 values of r
REFUSED_SAMPLING = 6000  # the inbound side's 60 %: arrive sampled when r < 6000
N = 40  # requests per run (P(no sampled id among them) = 0.7**40, ~6e-7)
ZIPKIN_N = 80  # the Zipkin phase's requests (no sampled one: 0.7**80, all sampled: 0.3**80)
REFUSAL = "inbound tracing samples the caller's ids again"


def requests(tag: str, n: int) -> list[dict[str, Any]]:
    return [{"vip": "user", "port": 9000, "path": f"/{tag}/{i}", "method": "GET", "body": "",
             "conn": "keep", "headers": {"host": "user:9000"}} for i in range(n)]


def wait_for(what: str, cond: Any, timeout: float, seen: Any = None) -> Any:
    """cond()'s first true value within `timeout` s, polled every 0.2 s; at
    the deadline an AssertionError with `what` and `seen()`, when given."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout}s: {what}" + (f": {seen()}" if seen else ""))


def refused(admin: str, user_ep: str) -> str:
    """The client node's note why user's inbound listener is not merged ("": none)."""
    node = client_node(fastpath_debug(admin), "client") or {}
    return str(node.get("not_offloaded", {}).get(f"inbound {user_ep}", ""))


def drive(m: Any, d: Path, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (d / "reqs.json").write_text(json.dumps(reqs))
    r = m.exec("client", [sys.executable, str(DRIVER), str(d / "reqs.json")],
               capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [x["status"] for x in out] == [200] * len(reqs), out
    return out  # type: ignore[no-any-return]


def delta(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    """The counts that moved (fastpath_counts keys: outcome, envoy/reason, service/outcome)."""
    return {k: n - before[k] for k, n in after.items() if n != before[k]}


def write_policy(d: Path, inbound_percent: int, zipkin: bool = False) -> None:
    tmp = d / "policies.yaml.new"  # by rename: the daemon never reads it half-written
    tmp.write_text(POLICY.replace("@INBOUND@", str(inbound_percent)).replace("@ZIPKIN@", ZIPKIN)
                   .replace("@PROVIDER@", ZIPKIN if zipkin else ""))
    tmp.rename(d / "policies.yaml")


def merged(admin: str, user_ep: str) -> bool:
    """The client's node merges user's inbound side (after the refused phase:
    both sides' new plans, as either with the other's old one is refused)."""
    node = client_node(fastpath_debug(admin), "client") or {}
    return user_ep in node.get("inbound_plans", {})


def collected(m: Any) -> list[dict[str, Any]]:
    """The spans the collector (the spans pod's app) recorded so far."""
    url = f"http://{m.pod('spans')['ip']}:9411/spans"
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def zipkin_stats(m: Any) -> dict[str, dict[str, int]]:
    """Per sidecar of the call (client's, user's), its tracing.zipkin.* counters."""
    return {pod: {k.removeprefix("tracing.zipkin."): n
                  for k, n in envoy_stats(m.state(), pod, "tracing.zipkin").items()}
            for pod in ("client-0", "user-0")}


def spans_sent(m: Any) -> tuple[list[dict[str, Any]], int]:
    """The collector's spans, and how many the call's sidecars sent it (spans_sent)."""
    return collected(m), sum(st.get("spans_sent", 0) for st in zipkin_stats(m).values())


def sidecar_lag(m: Any, want: list[tuple[str, str, str]]) -> str:
    """What the sidecars still run of the policy before ("": nothing). `want`:
    (pod, listener, text of the new policy in that listener's active config).
    A changed filter chain drains for the sidecar's --drain-time-s (1 s): its
    connections (the client sidecar's pooled ones to user's inbound side)
    keep the old config until then (seen: every SERVER span missing, the
    sampled requests sent while user's old inbound chain drained)."""
    for pod, listener, text in want:
        dump = json.loads(sidecar_admin(m.pod(pod), "/config_dump?resource=dynamic_listeners"))
        active = [lst.get("active_state") for lst in dump["configs"] if lst["name"] == listener]
        if text not in json.dumps(active):
            return f"{pod}: no {text} in {listener}"
        busy = {k: n for k, n in envoy_stats(m.state(), pod, "listener_manager.total_").items()
                if n and ("draining" in k or "warming" in k)}
        if busy:
            return f"{pod}: {busy}"
    return ""


def run(mode: str, root: Path) -> dict[str, Any]:
    """One mesh: the plain requests; with the fast path on also the metrics,
    the audit, the refused inbound side's requests and the Zipkin phase."""
    from mesh import audit
    from mesh.ready import wait_ready
    from mesh.runner import Mesh

    d = root / mode
    logdir = d / "logs"
    logdir.mkdir(parents=True)
    logdir.chmod(0o777)
    (d / "mesh.yaml").write_text(MESH.replace("@APP@", str(APP)).replace("@LOGDIR@", str(logdir)))
    write_policy(d, 30)
    m = Mesh(d / "mesh.yaml", f"mt{mode}{os.getpid() % 10000}", fastpath=mode, timeout=120)
    out: dict[str, Any] = {}
    try:
        st = m.up()
        admin = st["admin"]
        user_ep = f"{m.pod('user-0')['ip']}:9000"
        if mode == "on":  # client merged user's plan, its pools warm
            node = client_node(wait_ready(admin, timeout=90), "client")
            assert node and user_ep in node["inbound_plans"], node
            before = fastpath_counts(admin)
        out["plain"] = drive(m, d, requests("p", N))
        if mode == "off":
            return out
        out["counts"] = delta(before, fastpath_counts(admin))
        # `l7fp mesh audit --from client`: the client's outbound routes and the
        # inbound routes it reaches (user's, merged); not user's own outbound
        # side, whose node may still be compiling on a loaded machine (the full
        # audit found 4 of 6 once under load)
        out["audit"] = audit.run(m.state(), sender="client-0", wait_s=30)
        write_policy(d, 60)
        out["why"] = wait_for("the merge refuses user's inbound side",
                              lambda: refused(admin, user_ep), 60)
        want = [("user-0", "virtualInbound", '"random_sampling": {"value": 60}')]
        wait_for("user's sidecar runs the 60 % inbound side, none draining",
                 lambda: not sidecar_lag(m, want), 30, seen=lambda: sidecar_lag(m, want))
        before = fastpath_counts(admin)
        out["refused"] = drive(m, d, requests("r", N))
        out["refused_counts"] = delta(before, fastpath_counts(admin))
        zipkin_phase(m, d, admin, user_ep, out)
        return out
    finally:
        cp_log = Path(m.state_file).parent / "logs" / "control-plane.log"
        if cp_log.exists():  # for a failure's investigation
            (d / "control-plane.log").write_bytes(cp_log.read_bytes())
        m.down()


def zipkin_phase(m: Any, d: Path, admin: str, user_ep: str, out: dict[str, Any]) -> None:
    """Both sides of user at 30 % again, with the Zipkin provider: once the
    client's node (its program built with Zipkin from the start) merges
    user's inbound side again and the sidecars run it, the requests, the
    counts, the collector's spans (all in) and the sidecars' tracing.zipkin
    counters into `out`."""
    from mesh.ready import wait_ready

    write_policy(d, 30, zipkin=True)
    wait_for("the client's node merges user's Zipkin inbound side",
             lambda: merged(admin, user_ep), 60)
    vip = next(s["vip"] for s in m.state()["services"] if s["name"] == "user")
    want = [("client-0", f"{vip}_9000", ZIPKIN_TRACER), ("user-0", "virtualInbound", ZIPKIN_TRACER)]
    wait_for("the sidecars run the Zipkin listeners, none draining",
             lambda: not sidecar_lag(m, want), 30, seen=lambda: sidecar_lag(m, want))
    out["zipkin_cflags"] = (client_node(wait_ready(admin, timeout=60), "client") or {}).get("cflags")
    before = fastpath_counts(admin)
    t0 = time.monotonic()
    out["zipkin"] = drive(m, d, requests("z", ZIPKIN_N))
    out["zipkin_counts"] = delta(before, fastpath_counts(admin))
    sampled = sum(_head(r).get("x-b3-sampled") == "1" for r in out["zipkin"])

    def all_in() -> bool:  # the sidecars report by 5 spans or on a flush timer
        spans, sent = spans_sent(m)
        return len(spans) >= 2 * sampled and len(spans) == sent
    wait_for(f"two spans per sampled request ({sampled}), all the sidecars sent", all_in, 30,
             seen=lambda: f"the collector has {len(collected(m))}, the sidecars' counters {zipkin_stats(m)}")
    out["spans"] = collected(m)
    out["spans_after_s"] = round(time.monotonic() - t0, 1)
    out["zipkin_stats"] = zipkin_stats(m)


def _head(result: dict[str, Any]) -> dict[str, str]:
    """The request head the echo app received (lower-case names)."""
    return json.loads(result["body"])["headers"]  # type: ignore[no-any-return]


def _ids(results: list[dict[str, Any]]) -> list[str]:
    return [_head(r)["x-request-id"] for r in results]


def test_tracing_both_sides_kernel_serves_the_envoy_head(tmp_path: Path) -> None:
    from tests.support.env import require_kernel

    require_kernel()
    from mesh.audit import format_rows
    from mesh.audit_verdict import summary

    runs = both_modes(lambda mode: run(mode, tmp_path))
    off, on = runs["off"]["plain"], runs["on"]["plain"]
    for o, k in zip(off, on, strict=True):
        ho, hk = json.loads(o["body"])["headers"], json.loads(k["body"])["headers"]
        assert list(ho) == list(hk), (ho, hk)  # the same lines in the same order
        assert {n: v for n, v in ho.items() if n != "x-request-id"} == \
               {n: v for n, v in hk.items() if n != "x-request-id"}, (ho, hk)
        assert "x-envoy-decorator-operation" not in hk, hk
        assert o["server"] == "envoy" and k["server"] != "envoy", (o, k)  # k: straight from the app
    for ids in (_ids(off), _ids(on)):
        assert [i[14] for i in ids] == [version_digit(i, SAMPLING) for i in ids], ids
    assert {i[14] for i in _ids(on)} == {"4", "9"}, _ids(on)
    assert runs["on"]["counts"] == {"fast": N, "user/fast": N}, runs["on"]["counts"]
    rows = runs["on"]["audit"]
    s = summary(rows)
    assert s["audited"] == 6 and s["kernel"] == 6, "\n".join(format_rows(rows))
    # refused: the reason on the client's node, Envoy serves, the inbound side decides
    assert runs["on"]["why"].startswith(REFUSAL), runs["on"]["why"]
    refused_ids = _ids(runs["on"]["refused"])
    assert [i[14] for i in refused_ids] == [version_digit(i, REFUSED_SAMPLING) for i in refused_ids]
    assert all(r["server"] == "envoy" for r in runs["on"]["refused"]), runs["on"]["refused"]
    counts = runs["on"]["refused_counts"]  # the refused endpoint has no kernel pool
    assert counts == {"envoy/no_pool": N, "user/envoy": N}, counts
    check_zipkin(runs["on"])
    assert "-DDP_TRACE_ZIPKIN=1" in runs["on"]["zipkin_cflags"], runs["on"]["zipkin_cflags"]


def check_zipkin(on: dict[str, Any]) -> None:
    """Per request: unsampled, the kernel's (b3 lines with x-b3-sampled 0, no
    span); sampled, Envoy's (trace_sampled) and exactly a CLIENT span of the
    caller and a SERVER span of the callee with the app's x-b3-traceid."""
    heads = [_head(r) for r in on["zipkin"]]
    for r, h in zip(on["zipkin"], heads, strict=True):
        rid = h["x-request-id"]
        sampled = version_digit(rid, SAMPLING) == "9"  # the caller's decision from the id
        assert rid[14] == ("9" if sampled else "4") and h.get("x-b3-sampled") == str(int(sampled)), h
        assert (r["server"] == "envoy") == sampled, (r, h)  # not sampled: straight from the app
    sampled_ids = {h["x-b3-traceid"] for h in heads if h["x-b3-sampled"] == "1"}
    unsampled_ids = {h["x-b3-traceid"] for h in heads if h["x-b3-sampled"] == "0"}
    assert len(sampled_ids) + len(unsampled_ids) == ZIPKIN_N, [h["x-b3-traceid"] for h in heads]
    assert sampled_ids and unsampled_ids, (sampled_ids, unsampled_ids)  # both samples seen
    counts = on["zipkin_counts"]
    assert counts == {"fast": len(unsampled_ids), "envoy/trace_sampled": len(sampled_ids),
                      "user/fast": len(unsampled_ids), "user/envoy": len(sampled_ids)}, counts
    spans = on["spans"]
    assert {s["traceId"] for s in spans} == sampled_ids, (spans, sampled_ids)
    by_trace: dict[str, list[tuple[str, str]]] = {}
    for s in spans:
        by_trace.setdefault(s["traceId"], []).append((s.get("kind", ""), s["localEndpoint"]["serviceName"]))
    want = [("CLIENT", "client.mt"), ("SERVER", "user.mt")]
    assert all(sorted(v) == want for v in by_trace.values()), by_trace
    for pod, st in on["zipkin_stats"].items():
        assert st.get("reports_dropped") == 0 and st.get("reports_failed") == 0, (pod, st)
    print(f"zipkin: {ZIPKIN_N} requests, counts {counts}, {len(spans)} spans in "
          f"{on['spans_after_s']} s, sidecars {on['zipkin_stats']}")
