"""Rule 3 (one owner per rate-limit bucket) with the built-in `inline` decision.

`l7fp serve --fastpath on --fastpath-decide inline` (the mesh runner passes
$L7FP_FASTPATH_DECIDE): the agent runs the client's node with a decision that
offers no rate limit to the kernel, so it never claims the node's limiters and
the client's sidecar keeps them: of LIMIT + 2 requests to `limited`, exactly
LIMIT pass and the rest get Envoy's 429. Before the owner rule the residual
dropped Envoy's limiter all the same, and every request passed.
The l7fp decision's side (the kernel owns and enforces the bucket) is
test_fastpath_onoff.py::test_limiter_has_one_owner and its rate-limit counts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from mesh.ready import wait_ready

pytestmark = [pytest.mark.kernel, pytest.mark.mesh]
HERE = Path(__file__).resolve().parent
LIMIT = 3


def test_inline_decision_leaves_the_limit_to_envoy(kernel: None, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh.runner import Mesh

    logdir = tmp_path / "logs"
    logdir.mkdir()
    logdir.chmod(0o777)
    text = (HERE / "owner_mesh.yaml").read_text().replace("@ECHO@", str(HERE / "echo_app.py"))
    (tmp_path / "mesh.yaml").write_text(text.replace("@LOGDIR@", str(logdir)))
    (tmp_path / "owner_policies.yaml").write_text((HERE / "owner_policies.yaml").read_text())
    reqs = [{"svc": "limited", "vip": "limited", "port": 9200, "method": "GET", "path": f"/{i}",
             "headers": {"host": "limited:9200", "x-k3-id": str(i)}, "body": ""}
            for i in range(LIMIT + 2)]
    (tmp_path / "reqs.json").write_text(json.dumps(reqs))
    monkeypatch.setenv("L7FP_FASTPATH_DECIDE", "inline")
    m = Mesh(tmp_path / "mesh.yaml", f"own{os.getpid() % 10000}", fastpath="on", timeout=120)
    try:
        st = m.up()
        # settled (mesh.ready): no claim can still come after the view is taken
        dbg = wait_ready(st["admin"], timeout=60)
        r = m.exec("client", [sys.executable, str(HERE / "driver.py"), str(tmp_path / "reqs.json")],
                   capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        results = json.loads(r.stdout)
    finally:
        m.down()
    client = [n for n in dbg["nodes"] if n["pod"].startswith("client")]
    assert client and client[0]["decision"] == "inline", dbg
    statuses = [res["status"] for res in results]
    assert statuses == [200] * LIMIT + [429, 429], results
    assert all(res["server"] == "envoy" for res in results[LIMIT:]), results  # Envoy's 429
    assert dbg["limits_owned"] == {}, dbg["limits_owned"]
