"""Route timeouts on the fast path in a local mesh (NAME=timeout): paired mode.

The same requests from the client pod to a slow service whose route has a 1 s
timeout (policies below, the client's outbound side), once with `--fastpath
off` (Envoy sidecars) and once with `--fastpath on`. In the mesh the pooled
upstream is paired with the app's accepted socket (the response goes through
dp_srv_verdict, no TCP), which tests/kernel_datapath/test_timeouts.py (loopback,
unpaired) does not reach. Same answers both ways: 504 "upstream request
timeout" for a late answer and the connection still usable, a cut connection
when the body stalls past the deadline, fast answers untouched; with the fast
path on, the kernel (not Envoy) sent the 504 and the upstream connection of
the late request was closed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from k3_meshrun import run_slow_mesh
from k3_meshrun import slow_req as req
from support.onoff import both_modes

pytestmark = [pytest.mark.kernel, pytest.mark.mesh, pytest.mark.envoy,
              pytest.mark.timeout(240)]

POLICIES = """\
slow:
  outbound:
    routes:
    - name: t1
      match: {prefix: /t}
      route: {cluster: slow, timeout: 1s}
    - name: rest
      match: {prefix: /}
      route: {cluster: slow, timeout: 0s}
"""


SCRIPT = [
    [req("/t/quick", x_delay_ms="100"), req("/t/late", x_delay_ms="1600"), req("/t/after")],
    [req("/t/stall", x_stall_ms="2500")],
    [req("/n/slow", x_delay_ms="1200")],
]


def run_mesh(tmp: Path, mode: str) -> dict[str, Any]:
    return run_slow_mesh(tmp, "k3t", mode, POLICIES, SCRIPT, settle_s=0.5)


def test_timeouts_in_the_mesh_match_envoy(kernel: None, tmp_path: Path) -> None:
    runs = both_modes(lambda mode: run_mesh(tmp_path, mode))
    off, on = runs["off"], runs["on"]
    def seen(conn: list[dict[str, Any]]) -> list[tuple[int, str, bool]]:
        # a cut connection: EOF from Envoy (after its delayed close), an abort
        # from the kernel path (SOCK_DESTROY); both end the response early
        return [(r["status"], r["body"][:30], r["end"] == "complete") for r in conn]

    for c_on, c_off in zip(on["results"], off["results"], strict=True):
        assert seen(c_on) == seen(c_off), (c_on, c_off)
    quick, late, after = on["results"][0]
    assert late["status"] == 504 and late["body"] == "upstream request timeout"
    assert 0.9 < late["secs"] < 1.6
    assert json.loads(after["body"])["line"] == "GET /t/after HTTP/1.1"  # not the late one
    stall = on["results"][1][0]
    assert stall["body"] == "abc" and stall["end"] != "complete"
    client = next(n for n in on["dbg"]["nodes"] if n["pod"].startswith("client"))
    fired = client["timeouts_fired"]
    assert fired["timeout_504"] == 1 and fired["timeout_reset"] == 1, client
    metrics = [ln for ln in on["dbg"]["metrics"].splitlines()
               if ln.startswith("l7fp_fastpath_timeouts_total{") and client["node"] in ln]
    assert any('kind="timeout_504"' in ln and ln.endswith(" 1.0") for ln in metrics), metrics
    # paired: no upstream went over TCP, so dp_srv_verdict carried the answers
    assert client["unpaired_upstreams"] == 0
    assert "server" not in quick["headers"] and "server" not in late["headers"]
    # the late request's upstream connection was closed (the app saw its end)
    late_conn = {e["conn"] for e in on["events"]
                 if e["kind"] == "request" and "/t/late" in e["line"]}
    ended = {e["conn"] for e in on["events"] if e["kind"] == "end"}
    assert late_conn and late_conn <= ended
