"""Request mirroring in the kernel fast path vs Envoy's shadowing.

A local mesh (mesh.yaml + policies.yaml here): the client's outbound routes to
`web` mirror to `shadow` (100 %, 0 %, two policies, one without the host
suffix; `shadow` answers the /slow/ ones never: it closes after 2 s). mirror_app.py
records every request it receives. The same requests are sent with
`--fastpath off` (the client's Envoy sidecar forwards and shadows) and `on`
(the kernel forwards to web and posts a copy; the agent sends the shadow from
the client pod as the sidecar would). Per request: the client's answer is the
primary's, the same both ways, and `shadow` received the same copies (request
line, host with `-shadow`, headers, body) both ways; a slow, broken mirror
does not delay the client; the counters show that the kernel forwarded and the
agent shadowed them, and that only the request too big to copy went to Envoy.
The `envoy` variant also mirrors by `cluster_header`: the header names
`shadow`'s cluster, `web`'s (its shadow passes web's sidecar), an unknown
cluster, the ORIGINAL_DST PassthroughCluster (Envoy finds no host: no
shadow), or is absent; a second policy reads another header.
Two variants: `envoy` (policies.yaml: Envoy routes) and `istio` (a
VirtualService with `mirror`/`mirrors`/`mirrorPercentage` through the importer,
with istiod's default retry policy and attempt-count header on every route).

Run: .venv/bin/python -m pytest tests/kernel_mirror -q   (root)
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.mesh, pytest.mark.envoy, pytest.mark.slow,
              pytest.mark.timeout(300)]

HERE = Path(__file__).resolve().parent
DRIVER = HERE.parent / "kernel_retry" / "driver1w.py"  # head and body in one write
sys.path.insert(0, str(HERE.parent / "kernel_differential"))
from onoff_mesh import prepare, run_driver  # noqa: E402
from support.onoff import both_modes  # noqa: E402

from fastpath.request_id import UUID4  # noqa: E402
from mesh import ready  # noqa: E402

GAP_MS = 50  # fast path on: lets the agent refill the pools between connections
BIG = 5000  # bytes of body: too big to copy, Envoy mirrors that request
# Set per request by Envoy or its connection, not by the policy: compared by presence only.
VOLATILE = {"x-request-id"}

# variant -> (mesh file, policies file or dir). "istio": the config istiod would
# generate from a VirtualService with mirror/mirrors (plus its default retry policy)
MESHES = {"envoy": ("mesh.yaml", "policies.yaml"), "istio": ("mesh_istio.yaml", "istio")}

# (path, method, body, kept-alive connection or None)
CASES: list[tuple[str, str, str, str | None]] = [
    ("/m/a", "GET", "", None),
    ("/m/b?q=1", "POST", "k=v" * 50, None),
    ("/m/c", "PUT", "abc", "keep"),
    ("/m/d", "GET", "", "keep"),
    ("/m/e", "HEAD", "", None),
    ("/m/xff", "GET", "", None),  # the client's own x-forwarded-for: Envoy appends to it
    ("/m/big", "POST", "x" * BIG, None),
    ("/none/a", "GET", "", None),
    ("/none/b", "GET", "", None),
    ("/two/a", "GET", "", None),
    ("/two/b", "POST", "two", "keep"),
    ("/slow/a", "GET", "", None),
    ("/slow/b", "GET", "", None),
    ("/plain", "GET", "", None),
    ("/m/deny", "GET", "", None),  # web's inbound policy denies it: shadowed all the same
]


SHADOW_C = "outbound|9100||shadow.k6.svc.cluster.local"
WEB_C = "outbound|9000||web.k6.svc.cluster.local"
# envoy variant only: (path, method, body, request headers, pod -> shadows)
H_CASES: list[tuple[str, str, str, dict[str, str], dict[str, int]]] = [
    ("/h/a", "GET", "", {"x-k6-mirror": SHADOW_C}, {"shadow-0": 1}),
    ("/h/b", "POST", "hb", {"x-k6-mirror": WEB_C}, {"web-0": 1}),
    ("/h/u", "GET", "", {"x-k6-mirror": "nosuch"}, {}),
    ("/h/n", "GET", "", {}, {}),
    ("/h/p", "GET", "", {"x-k6-mirror": "PassthroughCluster"}, {}),
    ("/h/two", "PUT", "2", {"x-k6-mirror": WEB_C, "x-k6-mirror2": SHADOW_C},
     {"web-0": 1, "shadow-0": 1}),
]


def gen_requests(variant: str) -> list[dict[str, Any]]:
    reqs = []
    cases = [(p, m, b, c, {}) for p, m, b, c in CASES]
    if variant == "envoy":
        cases += [(p, m, b, None, h) for p, m, b, h, _ in H_CASES]
    for n, (path, method, body, conn, extra) in enumerate(cases):
        req = {"vip": "web", "port": 9000, "path": path, "method": method, "body": body,
               "headers": {"host": "web:9000", "x-k6-id": f"r{n}", "x-k6-client": "yes", **extra}}
        if conn:
            req["conn"] = conn
        if path == "/m/xff":
            req["headers"]["x-forwarded-for"] = "198.19.7.7"
        reqs.append(req)
    return reqs


def expected(variant: str) -> dict[str, dict[str, int]]:
    """request id -> pod -> shadows it gets (Envoy's policy)."""
    per = {"m": {"shadow-0": 1}, "two": {"shadow-0": 2}, "slow": {"shadow-0": 1}}
    out = {f"r{n}": per.get(p.split("/")[1], {}) for n, (p, *_) in enumerate(CASES)}
    if variant == "envoy":
        out |= {f"r{len(CASES) + i}": want for i, (*_, want) in enumerate(H_CASES)}
    return out


def shadows(logs: dict[str, list[dict[str, Any]]], pod: str) -> list[dict[str, Any]]:
    """The shadows `pod` received: all of shadow-0's; web-0's with the -shadow host
    (its other requests are the primaries)."""
    got = logs.get(pod, [])
    if pod == "shadow-0":
        return got
    return [r for r in got if dict(r["headers"]).get("host") == "web-shadow:9000"]


def wait_ready(admin: str) -> None:
    """Until every pod's plan is applied and the client has a free pooled
    upstream to web."""
    ready.wait_ready(admin, pools=1, every_node=True, timeout=150.0)


def wait_shadows(logdir: Path, variant: str, timeout: float = 8.0) -> None:
    """Until the mirrors logged every shadow Envoy's policy sends (or timeout:
    the test then shows which are missing)."""
    deadline = time.monotonic() + timeout
    want: Counter[str] = Counter()
    for pods in expected(variant).values():
        want.update(pods)
    while time.monotonic() < deadline:
        logs = read_logs(logdir)
        if all(len(shadows(logs, pod)) >= n for pod, n in want.items()):
            return
        time.sleep(0.1)


def read_logs(logdir: Path) -> dict[str, list[dict[str, Any]]]:
    """pod -> requests it received, in order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for f in sorted(logdir.glob("*.jsonl")):
        out[f.stem] = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
    return out


def run_mesh(tmp: Path, variant: str, mode: str, reqs: list[dict[str, Any]]) -> dict[str, Any]:
    d = tmp / mode
    logdir = prepare(HERE, d, *MESHES[variant], "mirror_app.py")
    # fire-and-forget shadows may arrive after the answers: settle waits for them
    run = run_driver(d, f"k6{variant[0]}{mode}", mode, DRIVER, reqs, GAP_MS, wait_ready,
                     settle=lambda: wait_shadows(logdir, variant))
    client_ip = next(p["ip"] for p in run["st"]["pods"] if p["name"].startswith("client"))
    return {"results": run["results"], "logs": read_logs(logdir), "counts": run["counts"],
            "dbg": run["dbg"], "client_ip": client_ip}


def by_id(reqs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in reqs:
        rid = dict(r["headers"]).get("x-k6-id", "-")
        out[rid].append(r)
    return out


def view(r: dict[str, Any], client_ip: str) -> tuple[Any, ...]:
    """What must be equal with the fast path on and off: request line, body and
    every header (values too, except the per-request ones of VOLATILE; the
    client pod's address, which differs between the two meshes, as CLIENT)."""
    hdrs = tuple(sorted((k, "*" if k in VOLATILE else v.replace(client_ip, "CLIENT"))
                        for k, v in r["headers"]))
    return (r["method"], r["path"], r["body"], hdrs)


@pytest.fixture(scope="module", params=sorted(MESHES))
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, Any]:
    from support.env import require_kernel

    require_kernel()
    variant = request.param
    tmp = tmp_path_factory.mktemp(f"k6mirror-{variant}")
    tmp.chmod(0o755)
    reqs = gen_requests(variant)
    out: dict[str, Any] = both_modes(lambda mode: run_mesh(tmp, variant, mode, reqs))
    out["reqs"] = reqs
    out["variant"] = variant
    return out


def test_client_gets_the_primary_answer(runs: dict[str, Any], kernel: None) -> None:
    for mode in ("off", "on"):
        for req, res in zip(runs["reqs"], runs[mode]["results"], strict=True):
            if req["path"] == "/m/deny":
                assert res["status"] == 403, (mode, req, res)  # web's inbound policy
                continue
            assert res["status"] == 200, (mode, req, res)
            assert res["served_by"] == "web-0", (mode, req, res)
    a = [(r["status"], r["body"]) for r in runs["off"]["results"]]
    b = [(r["status"], r["body"]) for r in runs["on"]["results"]]
    assert a == b


def test_shadows_equal_envoys(runs: dict[str, Any], kernel: None) -> None:
    for pod in ("shadow-0", "web-0"):
        off = by_id(shadows(runs["off"]["logs"], pod))
        on = by_id(shadows(runs["on"]["logs"], pod))
        for rid, pods in expected(runs["variant"]).items():
            assert len(off.get(rid, [])) == pods.get(pod, 0), ("off", pod, rid, off.get(rid))
            a = sorted(view(r, runs["off"]["client_ip"]) for r in off.get(rid, []))
            b = sorted(view(r, runs["on"]["client_ip"]) for r in on.get(rid, []))
            assert a == b, (pod, rid, a, b)


def test_shadow_carries_the_primarys_request_id(runs: dict[str, Any], kernel: None) -> None:
    """Envoy's shadow carries its primary's x-request-id (a UUID v4 the
    client's sidecar added); so does the kernel's copy, taken after
    bpf_src/dp_xrid.h inserted it (the agent sends the copy as it is)."""
    for mode in ("off", "on"):
        logs = runs[mode]["logs"]
        primary = by_id([r for r in logs.get("web-0", [])
                         if dict(r["headers"]).get("host") != "web-shadow:9000"])
        seen = 0
        for pod in ("shadow-0", "web-0"):
            for rid, copies in by_id(shadows(logs, pod)).items():
                ids = {dict(p["headers"]).get("x-request-id") for p in primary.get(rid, [])}
                if not ids:
                    continue  # no primary at the app (web's inbound policy denied it)
                got = {dict(r["headers"]).get("x-request-id") for r in copies}
                assert got <= ids and all(UUID4.fullmatch(i or "") for i in got), \
                    (mode, pod, rid, got, ids)
                seen += 1
        assert seen >= 10, (mode, seen)


def test_slow_broken_mirror_does_not_delay(runs: dict[str, Any], kernel: None) -> None:
    for mode in ("off", "on"):
        for req, res in zip(runs["reqs"], runs[mode]["results"], strict=True):
            if req["path"].startswith("/slow/"):
                assert res["secs"] < 1.0, (mode, req, res)  # slow answers after 2 s
        got = by_id(runs[mode]["logs"].get("shadow-0", []))
        slow = [f"r{n}" for n, (p, *_) in enumerate(CASES) if p.startswith("/slow/")]
        assert slow and all(rid in got for rid in slow), (mode, sorted(got))


def test_kernel_forwarded_and_agent_shadowed(runs: dict[str, Any], kernel: None) -> None:
    counts = runs["on"]["counts"]
    nodes = runs["on"]["dbg"].get("nodes", [])
    client = next(n for n in nodes if n["pod"].startswith("client"))
    print("fast path counters:", dict(counts), "mirrors:", client.get("mirrors"))
    # the 5 kB POST (Istio: its retry policy asks for the copy first)
    assert counts["envoy/mirror_copy"] + counts["envoy/retry_copy"] == 1, dict(counts)
    assert counts["fast"] >= len(runs["reqs"]) - 3, dict(counts)
    assert "-DDP_MIRROR=1" in client["cflags"]
    # the denied request went to Envoy, which forwards (web's sidecar denies) and shadows
    assert counts["envoy/mirror_inbound"] == 1, dict(counts)
    m = client["mirrors"]
    h = 4 if runs["variant"] == "envoy" else 0  # H_CASES' shadows
    assert m.get("queued", 0) == 12 + h and m.get("sent", 0) >= 10 + h, m  # slow ones may be pending
    if h:  # two policies per H_CASES request, each reads its own header
        assert (m.get("unknown_cluster"), m.get("no_cluster_header"), m.get("no_endpoint")) \
            == (1, 6, 1), m
