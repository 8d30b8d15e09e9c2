"""Manual check (not collected by pytest: about 90 s, over the CI budget):
path rewrites with the destination's inbound ROUTES by path and its header
adds, and a rewrite route's retries, fast path off vs on.

    sudo PYTHONPATH=. .venv/bin/python tests/kernel_differential/rewrite_inbound_check.py

The mesh rewrite/envoy/ (Envoy-resource policies): the client's routes
rewrite /old/ -> /new/ (adding x-rw-route) and /pot/ -> /tea/; web's inbound
routes add x-rw-in on /new/, answer 418 on /old/ and /tea/. Per request the
same status and body both ways, and web's app got the same request line and
headers in the same order (x-forwarded-proto and x-request-id, which the
client's sidecar or the kernel adds, included): Envoy's order is the client route's adds,
x-envoy-original-path, then the inbound sidecar's adds. Then (`retries`) the
client -> `slow` mesh of k3_meshrun.py with a prefix_rewrite route under
istiod's retry policy, an app that closes without answering (the
destination sidecar's 503, retried twice) and an inbound 418 on the old
path: the same answers and the same attempts at the app, the rewritten
path each time. Prints the fast-path counters; exits 1 on a difference. Owner: rwin (docs/fastpath.md "Path
rewrites").
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from collections import Counter  # noqa: E402

from k3_meshrun import run_slow_mesh  # noqa: E402
from k3_meshrun import slow_req as req  # noqa: E402
from onoff_mesh import prepare, run_driver  # noqa: E402
from test_rewrite_mesh import APP, DRIVER, read_log, view  # noqa: E402

from mesh.ready import wait_ready  # noqa: E402

PATHS = ["/old/x", "/old/y?q=1", "/pot/x", "/plain", "/new/z", "/tea/y", "/inrw/x?q",
         "/old/rw/y"]


def run(tmp: Path, mode: str) -> dict[str, Any]:
    reqs = [{"vip": "web", "port": 9000, "path": p, "method": "GET", "body": "",
             "headers": {"host": "web:9000", "x-rw-id": f"r{n}"}} for n, p in enumerate(PATHS)]
    d = tmp / mode
    logdir = prepare(HERE / "rewrite" / "envoy", d, "mesh.yaml", "policies.yaml",
                     str(HERE / "rewrite" / APP))
    out = run_driver(d, f"rwinx{mode}", mode, DRIVER, reqs, 50,
                     lambda admin: wait_ready(admin, pools=1, every_node=True, timeout=90.0))
    ip = next(p["ip"] for p in out["st"]["pods"] if p["name"].startswith("client"))
    return {**out, "got": read_log(logdir, "web-0"), "ip": ip}


RETRY_POLICIES = """\
slow:
  outbound:
    routes:
    - name: rw-retry
      match: {prefix: /old/}
      route:
        cluster: slow
        prefix_rewrite: /new/
        timeout: 0s
        retry_policy:
          retry_on: connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes
          retriable_status_codes: [503]
          num_retries: 2
    - name: rest
      match: {prefix: /}
      route: {cluster: slow, timeout: 0s}
  inbound:
    routes:
    - name: in-old
      match: {prefix: /old/}
      direct_response: {status: 418, body: {inline_string: "old path inbound\\n"}}
    - name: in-default
      match: {prefix: /}
"""
RETRY_SCRIPT = [[req("/old/fin", x_close="fin"), req("/old/after")], [req("/old/ok")]]


def retries(tmp: Path) -> int:
    """Differences between off and on (answers, attempts at the app)."""
    seen = {}
    for mode in ("off", "on"):
        out = run_slow_mesh(tmp / "retry", "rwr", mode, RETRY_POLICIES, RETRY_SCRIPT, 0.3)
        answers = [[(r["status"], r["body"][:40]) for r in conn] for conn in out["results"]]
        attempts = Counter(e["line"] for e in out["events"] if e["kind"] == "request")
        seen[mode] = (answers, attempts)
        print(mode, answers, dict(attempts))
        if mode == "on":
            client = next(n for n in out["dbg"]["nodes"] if n["pod"].startswith("client"))
            print("resets:", client.get("resets"))
    return int(seen["off"] != seen["on"])


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="rwinx-"))
    tmp.chmod(0o755)
    off, on = run(tmp, "off"), run(tmp, "on")
    bad = 0
    for n, path in enumerate(PATHS):
        a, b = off["results"][n], on["results"][n]
        va, vb = view(off["got"].get(f"r{n}"), off["ip"]), view(on["got"].get(f"r{n}"), on["ip"])
        same = (a["status"], a["body"], va) == (b["status"], b["body"], vb)
        bad += not same
        print("same" if same else "DIFFERENT", path, a["status"], va, "" if same else (b, vb))
    print("fast path counters:", dict(on["counts"]))
    bad += retries(tmp)
    if not bad:
        shutil.rmtree(tmp, ignore_errors=True)  # else kept: results, logs, debug
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
