"""Retries on the response status in the kernel fast path vs in Envoy.

A local mesh (mesh.yaml + policies.yaml here) whose client routes to `flaky`
(two pods) and `solo` (one pod) carry Istio's default retry policy
(retriable-status-codes [503], unavailable, cancelled, 2 retries,
previous_hosts). retry_app.py fails the attempts a request asks for (status,
grpc-status, x-envoy-overloaded, chunked, on one pod only). The same request
list is sent with `--fastpath off` (the Envoy sidecar retries) and `on` (the
kernel diverts the response to the agent, which re-sends the request): per
request the final status and body and the attempts the upstreams saw must be
equal, a retry after a failure on `flaky` must take the other pod, and the
fast path's counters must show that the kernel served and retried them.
The `envoy` variant also sends deadline_cases.py's requests (the `/d` routes
of policies.yaml: a route timeout with retries, a per-try timeout):
test_deadline_*.

Run: .venv/bin/python -m pytest tests/kernel_retry -q   (root)
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.mesh, pytest.mark.slow, pytest.mark.timeout(300)]

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "driver1w.py"  # head and body in one write
sys.path.insert(0, str(HERE.parent / "kernel_differential"))
import deadline_cases  # noqa: E402
import reset_cases  # noqa: E402
from onoff_mesh import prepare, run_driver  # noqa: E402
from support.onoff import both_modes  # noqa: E402

from mesh import ready  # noqa: E402

GAP_MS = 100  # fast path on: lets the agent refill the pools between connections

# (service, extra headers, method, body, expected status with Envoy's policy, attempts)
CASES: list[tuple[str, dict[str, str], str, str, int, int]] = [
    ("flaky", {}, "GET", "", 200, 1),
    ("flaky", {"x-fail": "1"}, "GET", "", 200, 2),
    ("flaky", {"x-fail": "2"}, "GET", "", 200, 3),
    ("flaky", {"x-fail": "5"}, "GET", "", 503, 3),  # retries exhausted: the last 503 passes
    ("flaky", {"x-fail": "1", "x-fail-status": "500"}, "GET", "", 500, 1),  # 500 not retriable
    ("flaky", {"x-fail": "1", "x-fail-grpc": "14"}, "GET", "", 200, 2),  # unavailable
    ("flaky", {"x-fail": "1", "x-fail-grpc": "1"}, "GET", "", 200, 2),  # cancelled
    ("flaky", {"x-fail": "1", "x-fail-grpc": "3"}, "GET", "", 200, 1),  # not in retry_on
    ("flaky", {"x-fail": "1", "x-overloaded": "1"}, "GET", "", 200, 2),  # inbound Envoy drops it
    ("flaky", {"x-fail": "1", "x-ratelimited": "1"}, "GET", "", 503, 1),  # never retried
    ("flaky", {"x-fail": "1", "x-chunked": "1"}, "GET", "", 200, 2),
    ("flaky", {"x-fail": "2", "x-chunked": "1"}, "POST", "k=v" * 100, 200, 3),
    ("flaky", {"x-fail": "1"}, "POST", "x" * 6000, 200, 2),  # too big to keep: Envoy retries
    ("flaky", {"x-fail": "1"}, "HEAD", "", 200, 2),
    ("flaky", {"x-fail": "9", "x-fail-pod": "flaky-0"}, "GET", "", 200, 0),  # 1 or 2 attempts
    ("solo", {"x-fail": "1"}, "GET", "", 200, 2),  # one endpoint: the same one again
    ("solo", {"x-fail": "2"}, "PUT", "abc", 200, 3),
    ("solo", {"x-fail": "3"}, "GET", "", 503, 3),
]
# variant -> (mesh file, policies file or dir, rounds of CASES). "istio": the
# config istiod would generate (default retry policy, include_request_attempt_count)
MESHES = {"envoy": ("mesh.yaml", "policies.yaml", 2), "istio": ("mesh_istio.yaml", "istio", 1)}
# The deadline cases (deadline_cases.py) run in this variant (the /d routes of
# policies.yaml), once: a mesh run per variant costs ~25 s.
DEADLINE_VARIANT = "envoy"
# the deadline tests take that variant's runs only (not a skip per other variant:
# in CI every kernel test must run)
ONLY_DEADLINE_VARIANT = pytest.mark.parametrize("runs", [DEADLINE_VARIANT], indirect=True)


def gen_requests(rounds: int) -> list[dict[str, Any]]:
    reqs = []
    for rnd in range(rounds):
        for i, (svc, hdrs, method, body, _, _) in enumerate(CASES):
            port = 9000 if svc == "flaky" else 9100
            req = {"svc": svc, "vip": svc, "port": port, "method": method, "path": f"/c{i}",
                   "headers": {"host": f"{svc}:{port}", **hdrs}, "body": body, "case": i}
            if rnd == 1 and i % 3 == 0:
                req["conn"] = f"keep-{svc}"  # kept-alive: binds reused after a retry
            reqs.append(req)
    for n, r in enumerate(reqs):
        r["headers"]["x-k3-id"] = f"r{n}"
    return reqs


def run_mesh(tmp: Path, variant: str, mode: str, reqs: list[dict[str, Any]],
             files: tuple[str, str] | None = None) -> dict[str, Any]:
    """One mesh run; `files`: (mesh file, policies) instead of MESHES[variant]'s
    (test_deadline_onoff.py)."""
    mesh_file, policies = files or MESHES[variant][:2]
    d = tmp / mode
    logdir = prepare(HERE, d, mesh_file, policies, "retry_app.py")
    run = run_driver(d, f"k4{variant[0]}{mode}", mode, DRIVER, reqs, GAP_MS, wait_pools)
    results, counts, dbg = run["results"], run["counts"], run["dbg"]
    attempts: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for f in sorted(logdir.glob("*.log")):
        if not f.name.startswith("client"):
            for ln in f.read_text().splitlines():
                rid, at, expected = ln.split()
                attempts[rid].append((int(at[1:]), f.stem, expected))
    seen = {rid: [pod for _, pod, _ in sorted(v)] for rid, v in attempts.items()}  # time order
    # (arrival ns, x-envoy-expected-rq-timeout-ms) of each attempt, in time order ("-": none)
    expected = {rid: [(at, e) for at, _, e in sorted(v)] for rid, v in attempts.items()}
    return {"results": results, "seen": seen, "expected": expected, "counts": counts, "dbg": dbg}


def wait_pools(admin: str) -> None:
    """Until every pod's plan is applied (a retry waits for the agent's thread)
    and the client node has free pooled upstreams to flaky (both pods) and solo."""
    # every node: 40 s per compile was seen next to two busy loops
    ready.wait_ready(admin, pools=3, every_node=True, timeout=150.0)


def view(res: dict[str, Any]) -> dict[str, Any]:
    """What must be equal with the fast path on and off (not the pod of a success)."""
    v: dict[str, Any] = {"status": res["status"]}
    try:
        body = json.loads(res["body"])
    except ValueError:
        v["body"] = res["body"]
        return v
    # x-envoy-attempt-count as the app got it (Istio: include_request_attempt_count)
    v.update(attempt=body["attempt"], body_len=body["body_len"],
             attempt_count=body["headers"].get("x-envoy-attempt-count"))
    return v


@pytest.fixture(scope="module", params=sorted(MESHES))
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, Any]:
    from support.env import require_kernel

    require_kernel()
    variant = request.param
    tmp = tmp_path_factory.mktemp(f"k4retry-{variant}")
    tmp.chmod(0o755)
    reqs = gen_requests(MESHES[variant][2])
    if variant == DEADLINE_VARIANT:  # the /d routes: timers with retries
        reqs += deadline_cases.gen_requests()
        reqs += reset_cases.gen_requests()  # the /x routes: retry_on with resets
    out: dict[str, Any] = both_modes(lambda mode: run_mesh(tmp, variant, mode, reqs))
    out["reqs"] = reqs
    out["variant"] = variant
    return out


def test_same_final_answer_and_attempts(runs: dict[str, Any], kernel: None) -> None:
    diffs = []
    for req, a, b in zip(runs["reqs"], runs["off"]["results"], runs["on"]["results"], strict=True):
        if "deadline" in req or "reset" in req:
            continue  # test_deadline_*, test_reset_*
        rid = req["headers"]["x-k3-id"]
        na, nb = len(runs["off"]["seen"].get(rid, [])), len(runs["on"]["seen"].get(rid, []))
        va, vb = view(a), view(b)
        if CASES[req["case"]][5] == 0:  # 1 or 2 attempts: the first pick is Envoy's RR or ours
            na = nb = 0
            va, vb = {"status": a["status"]}, {"status": b["status"]}
        if va != vb or na != nb:
            diffs.append((req["case"], req["method"], req["headers"], va, vb, na, nb))
    assert not diffs, f"{len(diffs)} requests differ (off vs on):\n" + "\n".join(map(str, diffs))


def test_answers_are_envoys_policy(runs: dict[str, Any], kernel: None) -> None:
    """Both ways: the status and number of attempts the policy gives; a retry on
    `flaky` goes to the pod not tried yet (previous_hosts)."""
    for mode in ("off", "on"):
        for req, res in zip(runs["reqs"], runs[mode]["results"], strict=True):
            if "deadline" in req or "reset" in req:
                continue  # test_deadline_*, test_reset_*
            _, _, _, _, status, attempts = CASES[req["case"]]
            pods = runs[mode]["seen"].get(req["headers"]["x-k3-id"], [])
            assert res["status"] == status, (mode, req, res, pods)
            if attempts:
                assert len(pods) == attempts, (mode, req, res, pods)
            else:  # fails only on flaky-0: never twice there
                assert pods.count("flaky-0") <= 1 and pods[-1] == "flaky-1", (mode, req, pods)
            if req["svc"] == "flaky" and len(pods) >= 2:
                assert pods[0] != pods[1], (mode, "retry on the same pod", req, pods)


def test_attempt_count_header(runs: dict[str, Any], kernel: None) -> None:
    """Istio's virtual hosts include the attempt count: the attempt that succeeds
    carries its number, both ways (the agent rewrites the kernel's copy)."""
    n = 0
    for mode in ("off", "on"):
        for res in runs[mode]["results"]:
            v = view(res)
            if "attempt" in v and runs["variant"] == "istio":
                assert v["attempt_count"] == str(v["attempt"]), (mode, v)
                n += 1
            elif "attempt" in v:
                assert v["attempt_count"] is None, (mode, v)
    assert runs["variant"] != "istio" or n >= 20, n


def test_kernel_served_and_retried(runs: dict[str, Any], kernel: None) -> None:
    counts = runs["on"]["counts"]
    print(f"{runs['variant']}: fast path counters: {dict(counts)}; agent: "
          f"{[n.get('retries') for n in runs['on']['dbg'].get('nodes', [])]}")
    assert counts["fast"] >= len(runs["reqs"]) // 2, dict(counts)
    assert counts["retry"] >= 5 * MESHES[runs["variant"]][2], dict(counts)
    # only the 6 kB POST (too big to keep) went to Envoy, once per round; bodies
    # that fit (300 B POST, PUT) were kept and retried by the kernel
    assert counts["envoy/retry_copy"] == MESHES[runs["variant"]][2], dict(counts)


def deadline_runs(runs: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(request, answer off, answer on) of the deadline cases (one variant only)."""
    assert runs["variant"] == DEADLINE_VARIANT, runs["variant"]
    return [(q, a, b) for q, a, b in zip(runs["reqs"], runs["off"]["results"],
                                         runs["on"]["results"], strict=True) if "deadline" in q]


@ONLY_DEADLINE_VARIANT
def test_deadline_answers_attempts_and_times(runs: dict[str, Any], kernel: None) -> None:
    """Route timeout with retries, per-try timeouts: both ways the status, body,
    attempts and answer time Envoy's router gives (deadline_cases.CASES, also
    checked on a plain Envoy by test_deadline_envoy.py)."""
    for req, off, on in deadline_runs(runs):
        for mode, res in (("off", off), ("on", on)):
            pods = runs[mode]["seen"].get(req["headers"]["x-k3-id"], [])
            why = deadline_cases.answer_problem(req, res, len(pods))
            assert not why, (mode, req["headers"], why, res, pods)
        assert view(off) == view(on), (off, on)  # not the pod: the first pick differs


@ONLY_DEADLINE_VARIANT
def test_deadline_expected_timeout_header(runs: dict[str, Any], kernel: None) -> None:
    """x-envoy-expected-rq-timeout-ms as the apps see it, per attempt, equal both
    ways: the destination's inbound sidecar (no use_remote_address, so the
    request is external to it) strips it, and the kernel, which delivers past
    that sidecar, does not insert it (fastpath.inbound_merge). The value Envoy
    sends on each attempt where nothing strips it is checked on a plain Envoy
    (test_deadline_envoy.py) and by unit tests of the retry agent's rewrite."""
    for req, _, _ in deadline_runs(runs):
        rid = req["headers"]["x-k3-id"]
        off, on = ([e for _, e in runs[m]["expected"][rid]] for m in ("off", "on"))
        assert off == on == ["-"] * len(off), (rid, off, on)


@ONLY_DEADLINE_VARIANT
def test_deadline_kernel_timed(runs: dict[str, Any], kernel: None) -> None:
    n = len(deadline_runs(runs))
    client = next(x for x in runs["on"]["dbg"]["nodes"] if x["pod"].startswith("client"))
    print(f"deadline: {n} requests; timeouts {client['timeouts_fired']}; "
          f"per-try {client['per_try_timeouts']}; retries {client['retries']}")
    for mode in ("off", "on"):
        print(mode, [(r["status"], round(r["secs"], 2)) for r in runs[mode]["results"][-n:]],
              [[e for _, e in runs[mode]["expected"].get(f"d{i}", [])] for i in range(n)])
    # the kernel path answered the 504s (route deadline, per-try) and reset nothing
    # (plus the per-try timeouts of reset_cases.py, in the same run)
    assert client["timeouts_fired"]["timeout_504"] == deadline_cases.N_504 + reset_cases.N_504, \
        client
    assert client["timeouts_fired"]["timeout_reset"] == 0, client
    assert set(client["per_try_timeouts"].values()) == {600}, client


@ONLY_DEADLINE_VARIANT
def test_reset_cases_answers_and_attempts(runs: dict[str, Any], kernel: None) -> None:
    """retry_on 5xx, gateway-error, reset and istiod's policy with an app that
    answers 5xx or closes without answering (reset_cases.py): both ways the
    status, body and attempts of Envoy's policy, equal off and on; the kernel
    path served them and handed its closes to the retry agent."""
    n = 0
    for req, off, on in zip(runs["reqs"], runs["off"]["results"], runs["on"]["results"],
                            strict=True):
        if "reset" not in req:
            continue
        n += 1
        rid = req["headers"]["x-k3-id"]
        for mode, res in (("off", off), ("on", on)):
            why = reset_cases.answer_problem(req, res, runs[mode]["seen"].get(rid, []))
            assert not why, (mode, req["path"], req["headers"], why, res)
        assert view(off) == view(on), (req["path"], off, on)
    assert n == len(reset_cases.CASES)
    client = next(x for x in runs["on"]["dbg"]["nodes"] if x["pod"].startswith("client"))
    print(f"reset cases: {n}; resets {client['resets']}; retries {client['retries']}")
    retried = sum(min(int(c[2].get("x-close", "0")), c[6] - 1) for c in reset_cases.CASES)
    assert client["resets"]["reset_retried"] == retried, client["resets"]
    assert client["resets"]["reset_503"] == 2, client["resets"]  # /x5 x-close 5, /xr
    # per-try timeouts under 5xx / gateway-error retried, the last one answered 504
    assert client["timeouts_fired"]["timeout_retried"] == reset_cases.N_PER_TRY_RETRIES, client

