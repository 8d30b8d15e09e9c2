"""An app that closes before answering, in a local mesh (NAME=reset): paired mode.

The same requests from the client pod to `slow` (k2_slow.py: `x-close: fin`
closes the accepted connection without answering, `x-close: rst` aborts it),
once with `--fastpath off` (Envoy sidecars) and once with `--fastpath on`. In
the mesh the pooled upstream U is paired with the app's accepted socket A: the
request goes straight into A, the app's close reaches U as a FIN, and a
response would pass dp_srv_verdict, which tests/kernel_datapath/test_reset.py
(loopback, unpaired) does not reach. Routes: untimed (0s, Istio's), a 1 s
timeout, and istiod's default retry policy (its retry_on has no `reset`, but
the destination's sidecar answers the close with a 503, which the client's
sidecar retries as a status: three attempts). Same answers both ways: Envoy's
503 "upstream connect error or disconnect/reset before headers. reset reason:
connection termination" at once, the connection then serving its next
request, and the app seeing the same attempts; with the fast path on, the
kernel path (not Envoy) sent the 503s.

Then (NAME=close) the app closes in the middle of a response (k2_slow.py
`x-cut`): 3 of 10 Content-Length bytes then a FIN or a RST, one chunk of a
chunked body, on the untimed and the retry route: both ways the client gets
the bytes that came and then EOF (its connection closed, as the sidecars do);
a whole answer and then the app's close keeps the client's connection (its
next request is served). Last, the app dies (a single replica): the kernel's
retry finds no upstream and hands the request to the client's sidecar, whose
answer (the destination sidecar's connect failure 503, after its retries) is
the one the client gets with the fast path off.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from k3_meshrun import run_slow_mesh
from k3_meshrun import slow_req as req
from support.onoff import both_modes

from fastpath.timeouts import RESET_BODY

pytestmark = [pytest.mark.kernel, pytest.mark.mesh, pytest.mark.envoy,
              pytest.mark.timeout(240)]

POLICIES = """\
slow:
  outbound:
    routes:
    - name: t1
      match: {prefix: /t}
      route: {cluster: slow, timeout: 1s}
    - name: istio-retry
      match: {prefix: /r}
      route:
        cluster: slow
        timeout: 0s
        retry_policy:
          retry_on: connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes
          retriable_status_codes: [503]
          num_retries: 2
    - name: rest
      match: {prefix: /}
      route: {cluster: slow, timeout: 0s}
"""


SCRIPT = [
    [req("/n/fin", x_close="fin"), req("/n/after-fin")],
    [req("/n/rst", x_close="rst"), req("/n/after-rst")],
    [req("/t/fin", x_close="fin"), req("/t/after-fin")],
    [req("/r/fin", x_close="fin"), req("/r/after-fin")],
]
RESETS = len(SCRIPT)
CUTS = [[req("/n/cut", x_cut="cl"), req("/n/after-cut")],
        [req("/n/cut-rst", x_cut="cl-rst"), req("/n/after-cut-rst")],
        [req("/n/cut-chunked", x_cut="chunked"), req("/n/after-cut-chunked")],
        [req("/r/cut", x_cut="cl"), req("/r/after-cut")]]
WHOLE = [[req("/n/whole", x_cut="whole"), "SLEEP 0.3", req("/n/after-whole")],
         [req("/n/chwhole", x_cut="chwhole"), "SLEEP 0.3", req("/n/after-chwhole")]]
# last: the app dies (k2_slow.py `x-close: die`) on istiod's retry route; every
# retry finds nothing listening: the destination sidecar's connect failure 503
DIES = [[req("/r/die", x_close="die")]]
SCRIPT += CUTS + WHOLE + DIES


def run_mesh(tmp: Path, mode: str) -> dict[str, Any]:
    return run_slow_mesh(tmp, "k3r", mode, POLICIES, SCRIPT, settle_s=0.3)


def line_or_body(body: str) -> str:
    """The request line an answer of k2_slow.py names, else the body as it came
    (a 503, the bytes of a cut answer)."""
    return json.loads(body)["line"] if body.startswith("{") else body


def attempts(events: list[dict[str, Any]]) -> Counter[str]:
    """Request lines the app saw, with how often."""
    return Counter(e["line"] for e in events if e["kind"] == "request")


def test_reset_before_response_in_the_mesh_matches_envoy(kernel: None, tmp_path: Path) -> None:
    runs = both_modes(lambda mode: run_mesh(tmp_path, mode))
    off, on = runs["off"], runs["on"]

    def seen(conn: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(r["status"], line_or_body(r["body"]), r["headers"].get("content-type"),
                 r["end"]) for r in conn]

    for c_on, c_off in zip(on["results"], off["results"], strict=True):
        assert seen(c_on) == seen(c_off), (c_on, c_off)
    for reset, after in on["results"][:RESETS]:
        assert reset["status"] == 503 and reset["body"] == RESET_BODY, reset
        assert "server" not in reset["headers"], reset  # the kernel path answered
        assert reset["secs"] < 0.8, reset  # at once (the /t timer is 1 s)
        assert after["status"] == 200, after  # the connection still serves
    assert attempts(on["events"]) == attempts(off["events"])
    client = next(n for n in on["dbg"]["nodes"] if n["pod"].startswith("client"))
    # /r: two closes handed to the retry agent as the inbound sidecar's 503, the third answered
    assert client["resets"]["reset_503"] == 4, client["resets"]
    # /r/fin: 2; the dying app: 1, or 2 when the first retry took a pooled
    # upstream it had just closed (not reaped yet), which then closed too
    assert client["resets"]["reset_retried"] in (3, 4), client["resets"]
    assert attempts(on["events"])["GET /r/fin HTTP/1.1"] == 3
    assert client["timeouts_fired"]["timeout_504"] == 0
    assert client["unpaired_upstreams"] == 0  # paired: the dp_srv_verdict way
    for conn in on["results"][RESETS:RESETS + len(CUTS)]:
        assert len(conn) == 1 and conn[0]["end"] == "eof", conn  # cut, then closed
        assert conn[0]["secs"] < 0.8, conn  # at the app's close
    for whole, after in on["results"][-1 - len(WHOLE):-1]:  # kept: the next one served
        assert whole["end"] == "complete" and after["status"] == 200, (whole, after)
    died = on["results"][-1][0]
    assert died["status"] == 503 and "connection failure" in died["body"], died
    assert client["handoffs"]["answered"] == 1, client["handoffs"]  # Envoy's answer, relayed
    assert client["closes"]["close_eof"] == len(CUTS), client["closes"]
    metrics = [ln for ln in on["dbg"]["metrics"].splitlines()
               if ln.startswith("l7fp_fastpath_resets_total{") and client["node"] in ln]
    assert any('kind="reset_503"' in ln and ln.endswith(" 4.0") for ln in metrics), metrics
