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
audit --from client` finds its 4 KERNEL routes (client's two outbound
listeners, user's inbound and its own) served by the kernel.

Then, on the same running mesh, the inbound side samples 60 % (it would
mark ids the caller left unsampled): the merge refuses user's inbound
listener (fastpath.inbound_merge.trace_refusal), /debug/fastpath says why,
the requests go to Envoy, and the app gets the inbound sidecar's decision
(r < 6000).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fastpath.tracing import version_digit
from mesh.ready import client_node, fastpath_debug

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
"""
POLICY = """
# client's own inbound side is not transparent (a header add): the client's node
# merges it, so -DDP_INBOUND stays compiled in when user's inbound side is
# refused, and the refusal is a plan apply (milliseconds), not a second compile
client:
  inbound:
    routes:
    - match: {prefix: /}
      request_headers_to_add: [{header: {key: x-mt-in, value: client}}]
user:
  outbound:
    tracing: {random_sampling: {value: 30}}
    routes:
    - name: user-call
      match: {prefix: /}
      decorator: {operation: user-call}
  inbound:
    tracing: {random_sampling: {value: @INBOUND@}}
    routes:
    - name: user-serve
      match: {prefix: /}
      decorator: {operation: user-serve}
"""
SAMPLING = 3000  # the caller's random_sampling 30 %, as 10000 values of r
REFUSED_SAMPLING = 6000  # the inbound side's 60 %: arrive sampled when r < 6000
N = 40  # requests per run (P(no sampled id among them) = 0.7**40, ~6e-7)
REFUSAL = "inbound tracing samples the caller's ids again"


def requests(tag: str, n: int) -> list[dict[str, Any]]:
    return [{"vip": "user", "port": 9000, "path": f"/{tag}/{i}", "method": "GET", "body": "",
             "conn": "keep", "headers": {"host": "user:9000"}} for i in range(n)]


def wait_for(what: str, cond: Any, timeout: float) -> Any:
    """cond()'s first true value within `timeout` s, polled every 0.2 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout}s: {what}")


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


def write_policy(d: Path, inbound_percent: int) -> None:
    tmp = d / "policies.yaml.new"  # by rename: the daemon never reads it half-written
    tmp.write_text(POLICY.replace("@INBOUND@", str(inbound_percent)))
    tmp.rename(d / "policies.yaml")


def run(mode: str, root: Path) -> dict[str, Any]:
    """One mesh: the plain requests; with the fast path on also the metrics,
    the audit, and the refused inbound side's requests."""
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
        before = fastpath_counts(admin)
        out["refused"] = drive(m, d, requests("r", N))
        out["refused_counts"] = delta(before, fastpath_counts(admin))
        return out
    finally:
        cp_log = Path(m.state_file).parent / "logs" / "control-plane.log"
        if cp_log.exists():  # for a failure's investigation
            (d / "control-plane.log").write_bytes(cp_log.read_bytes())
        m.down()


def _ids(results: list[dict[str, Any]]) -> list[str]:
    return [json.loads(r["body"])["headers"]["x-request-id"] for r in results]


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
    assert s["audited"] == 4 and s["kernel"] == 4, "\n".join(format_rows(rows))
    # refused: the reason on the client's node, Envoy serves, the inbound side decides
    assert runs["on"]["why"].startswith(REFUSAL), runs["on"]["why"]
    refused_ids = _ids(runs["on"]["refused"])
    assert [i[14] for i in refused_ids] == [version_digit(i, REFUSED_SAMPLING) for i in refused_ids]
    assert all(r["server"] == "envoy" for r in runs["on"]["refused"]), runs["on"]["refused"]
    counts = runs["on"]["refused_counts"]  # the refused endpoint has no kernel pool
    assert counts == {"envoy/no_pool": N, "user/envoy": N}, counts
