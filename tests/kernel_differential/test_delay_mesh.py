"""Fault delays on the fast path in a local mesh (paired upstreams).

The client pod calls `api` whose outbound route `/d` delays every request
300 ms (Istio's shape: an empty fault filter, the delay per route, `timeout:
0s`); once with `--fastpath off` (the Envoy sidecars delay) and once with
`--fastpath on`. In the mesh the pooled upstream is paired with the app's
accepted socket: the held request goes from U's receive queue back out over
U (agent_delay.py), the response through dp_srv_verdict, which
tests/kernel_datapath/test_delay.py (loopback, unpaired) does not reach.
Same answers and the same request seen by the app (but for the sidecars' own
headers), delayed both ways; with the fast path on the kernel served them. The
destination's inbound RBAC denies `/d/deny`: Envoy's 403 comes after the
client's delay, so the kernel hands that request to Envoy (`delay_inbound`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from k3_meshrun import run_script
from support.onoff import both_modes

pytestmark = [pytest.mark.kernel, pytest.mark.mesh, pytest.mark.envoy,
              pytest.mark.timeout(240),
              pytest.mark.alone]  # an undelayed request answers within 0.29 s

HERE = Path(__file__).resolve().parent
MESH = """\
namespace: k3d
policies: policies.yaml
services:
  client:
    command: ["${{PYTHON}}", "{echo}", --port, "8080", --log-dir, "{logs}"]
    ports: [8080]
    calls: [api]
  api:
    command: ["${{PYTHON}}", "{echo}", --port, "9000", --log-dir, "{logs}"]
    ports: [9000]
"""
FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
POLICIES = f"""\
api:
  outbound:
    http_filters:
    - name: envoy.filters.http.fault
      typed_config: {{"@type": {FAULT}}}
    routes:
    - name: d300
      match: {{prefix: /d}}
      route: {{cluster: api, timeout: 0s}}
      typed_per_filter_config:
        envoy.filters.http.fault:
          "@type": {FAULT}
          delay: {{fixed_delay: 0.3s, percentage: {{numerator: 100}}}}
    - name: rest
      match: {{prefix: /}}
      route: {{cluster: api, timeout: 0s}}
  inbound:
    http_filters:
    - name: envoy.filters.http.rbac
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
        rules:
          action: DENY
          policies:
            deny-d:
              permissions: [{{url_path: {{path: {{prefix: /d/deny}}}}}}]
              principals: [{{any: true}}]
    routes:
    - name: in-default
      match: {{prefix: /}}
"""


def req(path: str, method: str = "GET", body: str = "") -> str:
    extra = f"content-length: {len(body)}\r\n" if body else ""
    return f"{method} {path} HTTP/1.1\r\nHost: api:9000\r\nx-k3-id: {path}\r\n{extra}\r\n{body}"


SCRIPT = [[req("/d/1"), req("/z/1"), req("/d/post", "POST", "hello")], [req("/d/2")],
          [req("/d/deny")]]


def run_mesh(tmp: Path, mode: str) -> dict[str, Any]:
    d = tmp / mode
    logs = d / "logs"
    logs.mkdir(parents=True)
    logs.chmod(0o777)
    (d / "mesh.yaml").write_text(MESH.format(echo=HERE / "echo_app.py", logs=logs))
    (d / "policies.yaml").write_text(POLICIES)
    return run_script(d, f"k3d{mode}", mode, "api", SCRIPT)


def test_fault_delay_in_the_mesh_matches_envoy(kernel: None, tmp_path: Path) -> None:
    runs = both_modes(lambda mode: run_mesh(tmp_path, mode))
    off, on = runs["off"], runs["on"]
    # the destination's inbound DENY after the client's delay: 403 at >= 0.3 s both
    # ways (the kernel hands it to Envoy: its reply could not wait)
    (deny_on,), (deny_off,) = on["results"].pop(), off["results"].pop()
    assert deny_on["status"] == deny_off["status"] == 403, (deny_on, deny_off)
    assert deny_on["body"] == deny_off["body"] and 0.29 <= deny_on["secs"] < 1.3
    assert 0.29 <= deny_off["secs"] < 1.3
    flat_on = [r for conn in on["results"] for r in conn]
    flat_off = [r for conn in off["results"] for r in conn]
    assert len(flat_on) == len(flat_off) == 4
    for f, e in zip(flat_on, flat_off, strict=True):
        bf, be = json.loads(f["body"]), json.loads(e["body"])
        assert (f["status"], bf["path"], bf["method"], bf["body_len"], bf["pod"]) == \
            (e["status"], be["path"], be["method"], be["body_len"], be["pod"])
        # what the app saw: the sidecars' own headers aside, the same request
        assert set(bf["headers"]) <= set(be["headers"]), (bf["headers"], be["headers"])
        assert not any(h.startswith("x-envoy-fault") for h in be["headers"])
        assert e["headers"].get("server") == "envoy"  # the sidecars answered
        assert f["headers"].get("server") != "envoy", f  # the app, straight from the kernel
    for r in (*flat_on, *flat_off):
        delayed = json.loads(r["body"])["path"].startswith("/d")
        assert (0.29 <= r["secs"] < 1.3) if delayed else r["secs"] < 0.29, r
    client = next(n for n in on["dbg"]["nodes"] if n["pod"].startswith("client"))
    assert client["unpaired_upstreams"] == 0  # paired: the way test_delay.py does not take
    assert client["delays"]["sent"] == 3, client["delays"]
    delayed = sum(c["requests"] for c in client["counters"]
                  if c["outcome"] == "fast" and c["reason"] == "delayed")
    assert delayed == 3
    inbound = sum(c["requests"] for c in client["counters"]
                  if c["outcome"] == "envoy" and c["reason"] == "delay_inbound")
    assert inbound == 1, client["counters"]
