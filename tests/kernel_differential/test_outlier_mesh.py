"""Outlier detection on kernel routes vs Envoy's, in a local mesh (NAME=outlier).

outlier/mesh.yaml: the client pod calls `od`, `op` and `oq` (2 pods each,
Istio DestinationRules in outlier/istio: round robin, consecutive5xxErrors 3,
interval 0.5 s, baseEjectionTime 1 s; `od` maxEjectionPercent 50, `op` 100
with minHealthPercent 50, i.e. healthy_panic_threshold 50, ejected 3 s; `oq` below). The app
(tests/kernel_retry/retry_app.py) answers 500 on the pod a request names
(`x-fail-pod`), or on every pod. The same paced requests (a new connection
each) go out with `--fastpath off` (the client's sidecar detects) and `on`
(the kernel counts, ejects, skips; the agent unejects); per run the app logs
say which pod got each request. Compared (RR start and timing differ by a
few ms between runs, so properties rather than sequences):

* one bad pod: the client sees exactly 3 errors before the bad pod stops
  getting requests; none reaches it while ejected (1 s, then 2 s at the
  second ejection); it comes back (another 3 errors) after the ejection time;
* every pod bad (`op`): after both ejections the healthy share is 0 % < 50 %:
  panic, every pod gets requests again, as in Envoy;
* every pod bad, no panic (`oq`, 2 pods, Istio's panic threshold 0, ejected
  3 s): a stretch of Envoy's 503 "no healthy upstream" (the kernel's reply
  with the fast path on) of the same start and length, then a pod is back;
* route timeouts on Envoy's path (`ot`, 1 pod, a 300 ms route timeout, the
  app answering after 1 s, every request `Connection: close`): ejected after
  the third, then Envoy's 503 "no healthy upstream" (NAME=odtimeout: with the
  fast path on the kernel's detector counts them from the sidecar's access
  log, fastpath.als.RouteTimeouts; before, it never ejected).

Each service mixes both paths: every ENVOY_EVERY-th request says
`Connection: close`, which the kernel hands to the client's sidecar (a
reason unrelated to outlier detection). With the fast path on, one detector (the kernel's)
counts both paths' responses (Envoy's over ALS), and both paths skip the
host while it is ejected (Envoy through EDS UNHEALTHY): the errors before
ejection, the gaps with no request to the bad pod and the comebacks are
those of Envoy alone. The kernel served every other request.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.mesh, pytest.mark.envoy,
              pytest.mark.timeout(300),
              pytest.mark.alone]  # ejection gaps and the agent's outlier ticks: CPU moves them

HERE = Path(__file__).resolve().parent
RETRY = HERE.parent / "kernel_retry"
sys.path.insert(0, str(HERE))
from onoff_mesh import prepare  # noqa: E402
from support.onoff import both_modes  # noqa: E402

from mesh.ready import wait_ready  # noqa: E402

DRIVER = RETRY / "driver1w.py"
GAP_MS = 60  # between requests, both modes: 16 requests a second
N_ONE_BAD = 95  # ~6 s: two ejections of the bad pod (1 s, then 2 s) and back
N_ALL_BAD = 30
N_NONE = 75  # `oq`: both pods bad, no panic: Envoy's 503 "no healthy upstream" (~4 s), then a pod
# back (at 60 the comeback was the last request of a loaded run; 75 stays within N_ONE_BAD's time)
NO_HEALTHY = "no healthy upstream"
ENVOY_EVERY = 3  # every third request goes to Envoy (`Connection: close`: a kernel punt)
N_OD_ENVOY = len(range(ENVOY_EVERY - 1, N_ONE_BAD, ENVOY_EVERY))
N_TIMEOUT = 6  # `ot`: three route timeouts, then ejected
OT_GAP_MS = 500  # the kernel's ejection reaches the sidecar's EDS before the next request
N_ENVOY = sum(len(range(ENVOY_EVERY - 1, n, ENVOY_EVERY))
              for n in (N_ONE_BAD, N_ALL_BAD, N_NONE)) + N_TIMEOUT  # ot's all go to Envoy
OQ = slice(N_ONE_BAD + N_ALL_BAD, N_ONE_BAD + N_ALL_BAD + N_NONE)  # requests of each service
OT = slice(OQ.stop, OQ.stop + N_TIMEOUT)


def gen_requests() -> list[dict[str, Any]]:
    """`od` (od-1 fails), `op` and `oq` (every pod fails); every ENVOY_EVERY-th
    request of each says `Connection: close`: the kernel hands it to Envoy."""
    reqs = []
    for vip, port, n, pfx, fail in (("od", 9000, N_ONE_BAD, "a", {"x-fail-pod": "od-1"}),
                                    ("op", 9100, N_ALL_BAD, "b", {}),
                                    ("oq", 9200, N_NONE, "c", {})):
        for i in range(n):
            hdrs = {"host": f"{vip}:{port}", "x-fail": "1", **fail, "x-fail-status": "500"}
            if i % ENVOY_EVERY == ENVOY_EVERY - 1:
                hdrs["connection"] = "close"
            reqs.append({"vip": vip, "port": port, "method": "GET", "path": f"/{pfx}{i}",
                         "headers": hdrs, "body": ""})
    for i in range(N_TIMEOUT):  # to the sidecar (Connection: close), answered after 1 s
        reqs.append({"vip": "ot", "port": 9300, "method": "GET", "path": f"/t{i}", "body": "",
                     "headers": {"host": "ot:9300", "connection": "close", "x-delays": "1000"}})
    for n, r in enumerate(reqs):
        r["headers"]["x-k3-id"] = f"o{n}"
    return reqs


def run_mesh(tmp: Path, mode: str, reqs: list[dict[str, Any]]) -> dict[str, Any]:
    import os
    import urllib.request

    from mesh.runner import Mesh

    d = tmp / mode
    logdir = prepare(HERE / "outlier", d, "mesh.yaml", "istio", str(RETRY / "retry_app.py"))
    m = Mesh(d / "mesh.yaml", f"kod{mode}{os.getpid() % 10000}", fastpath=mode, timeout=120)
    dbg: dict[str, Any] = {}
    t = [time.monotonic()]
    try:
        st = m.up()
        t.append(time.monotonic())
        if mode == "on":
            wait_ready(st["admin"], pools=7, every_node=True, timeout=90.0)  # as before: all 8 nodes (a compile beside the outlier ticks moved its gaps)
            wait_kernel_owned(m)
        t.append(time.monotonic())
        results = drive(m, d, reqs)
        t.append(time.monotonic())
        stats = m.exec("client", [sys.executable, "-c", "import urllib.request as u; print(u.urlopen("
                                  "'http://127.0.0.1:15000/stats?filter=od%5C.default').read().decode())"],
                       capture_output=True, text=True, timeout=30)
        (d / "envoy_outlier_stats.txt").write_text(f"rc={stats.returncode}\n" + stats.stdout
                                                   + stats.stderr)
        if mode == "on":
            dbg = json.loads(urllib.request.urlopen(f"http://{st['admin']}/debug/fastpath",
                                                    timeout=5).read())
            (d / "debug.json").write_text(json.dumps(dbg))
    finally:
        m.down()
        t.append(time.monotonic())
        (d / "phases_s.json").write_text(json.dumps([round(b - a, 1) for a, b in zip(t, t[1:],
                                                                                    strict=False)]))
    seen: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for f in sorted(logdir.glob("*.log")):
        for ln in f.read_text().splitlines():
            rid, at, _ = ln.split()
            seen[rid].append((int(at[1:]), f.stem))
    pods = [min(seen[r["headers"]["x-k3-id"]])[1] if seen.get(r["headers"]["x-k3-id"]) else "-"
            for r in reqs]
    return {"results": results, "pods": pods, "dbg": dbg,
            "envoy_outlier_stats": (d / "envoy_outlier_stats.txt").read_text()}


LOGGER_PROBE = ("import urllib.request as u; print('l7fp_outlier' in u.urlopen("
                "'http://127.0.0.1:15000/config_dump?resource=dynamic_listeners').read().decode())")
# One request through the client's sidecar (`Connection: close`: the kernel
# hands it to Envoy; no x-fail: a 200, which only zeroes counters): its first
# logged attempt opens the sidecar's outlier access-log stream.
WARM_UP = ("import urllib.request as u; u.urlopen(u.Request('http://od:9000/warm', "
           "headers={'connection': 'close'}), timeout=5).read()")
# True once the sidecar's `od` cluster has no outlier_detection (the kernel's detector alone).
DETECTOR_PROBE = """
import json, urllib.request as u
d = json.loads(u.urlopen('http://127.0.0.1:15000/config_dump?resource=dynamic_active_clusters').read())
cs = [c['cluster'] for c in d.get('configs', []) if '||od.default' in c['cluster']['name']]
print(bool(cs) and all('outlier_detection' not in c for c in cs))
"""


def wait_kernel_owned(m: Any) -> None:
    """Until the client's sidecar runs the residual of a kernel-owned node
    whose Envoy detector the kernel took: the agent claims the node once its
    program is live (the residual then has the outlier access log), and takes
    Envoy's detector once the sidecar's access-log stream is open
    (fastpath.als); until then Envoy's own detector counts. One warm-up
    request (an `envoy` outcome in the counters) opens the stream.

    The deadline covers a logger given up meanwhile: a node whose residual
    had the logger GIVE_UP_S with no stream (no request yet: the wait for
    every node took longer, seen at load ~8) loses it until the agent offers
    it again RETRY_FIRST_S later (fastpath.als_owner)."""
    from fastpath.als_owner import GIVE_UP_S, RETRY_FIRST_S

    end = time.monotonic() + GIVE_UP_S + RETRY_FIRST_S + 30.0
    _wait_probe(m, LOGGER_PROBE, end, "the client's sidecar never got the access logger")
    r = m.exec("client", [sys.executable, "-c", WARM_UP], capture_output=True, text=True,
               timeout=30)
    assert r.returncode == 0, r.stderr
    _wait_probe(m, DETECTOR_PROBE, end, "the client's sidecar kept its own od detector "
                                        "(no access-log stream accepted?)")


def _wait_probe(m: Any, probe: str, end: float, why: str) -> None:
    while time.monotonic() < end:
        r = m.exec("client", [sys.executable, "-c", probe], capture_output=True, text=True,
                   timeout=30)
        if r.stdout.strip() == "True":
            return
        time.sleep(0.2)
    raise AssertionError(why)


def drive(m: Any, d: Path, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The requests of each service (`od`, `op`, `oq`: separate clusters, so
    separate detectors) from three drivers at once in the client pod, each
    paced GAP_MS; results in `reqs`' order."""
    from concurrent.futures import ThreadPoolExecutor

    def one(vip: str) -> list[dict[str, Any]]:
        f = d / f"reqs-{vip}.json"
        f.write_text(json.dumps([r for r in reqs if r["vip"] == vip]))
        gap = OT_GAP_MS if vip == "ot" else GAP_MS
        r = m.exec("client", [sys.executable, str(DRIVER), str(f), str(gap)],
                   capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    vips = list(dict.fromkeys(r["vip"] for r in reqs))
    with ThreadPoolExecutor(len(vips)) as ex:
        out = dict(zip(vips, ex.map(one, vips), strict=True))
    return [res for vip in vips for res in out[vip]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from support.env import require_kernel

    require_kernel()
    tmp = tmp_path_factory.mktemp("k-outlier")
    tmp.chmod(0o755)
    reqs = gen_requests()
    return both_modes(lambda mode: run_mesh(tmp, mode, reqs))


def one_bad_view(run: dict[str, Any]) -> dict[str, Any]:
    """Errors in a row the client saw before the bad pod's traffic stopped,
    the gaps (in requests) during which it got none, and what it answered."""
    statuses = [r["status"] for r in run["results"][:N_ONE_BAD]]
    pods = run["pods"][:N_ONE_BAD]
    bad = [i for i, p in enumerate(pods) if p == "od-1"]
    assert all(statuses[i] == 500 for i in bad), (statuses, pods)
    assert all(statuses[i] == 200 for i in range(N_ONE_BAD) if i not in bad), (statuses, pods)
    # bursts: consecutive hits on od-1 at most 5 requests apart (round robin over
    # 2; with the fast path on, the kernel's and Envoy's round robins interleave)
    bursts, cur = [], [bad[0]] if bad else []
    for a, b in zip(bad, bad[1:], strict=False):
        if b - a <= 5:
            cur.append(b)
        else:
            bursts.append(cur)
            cur = [b]
    if cur:
        bursts.append(cur)
    gaps = [b[0] - a[-1] for a, b in zip(bursts, bursts[1:], strict=False)]
    return {"burst_sizes": [len(b) for b in bursts], "gaps": gaps, "errors": len(bad)}


def test_one_bad_pod_ejected_and_back_as_in_envoy(runs: dict[str, Any], kernel: None) -> None:
    """Envoy (seen, four runs): 3 errors, no request for ~1.3 s (ejected 1 s,
    unejected at a 0.5 s tick), then 3 errors and ~5 more: the second
    ejection came within update_merge_window (1 s) of the unejection, so its
    LB update was merged and delivered 1 s later; then ejected 2 s
    (multiplier 2), 1 s of which the LB still sent to it. The interval ticks
    of Envoy and of the agent have their own phase: a gap may differ by one
    tick (0.5 s, ~8 requests)."""
    off, on = one_bad_view(runs["off"]), one_bad_view(runs["on"])
    msg = (off, on, seq(runs["off"]), seq(runs["on"]))
    for view in (off, on):
        assert len(view["gaps"]) >= 2 and view["burst_sizes"][0] == 3, msg
        assert 12 <= view["gaps"][0] <= 30, msg  # ejected for 1 s + the tick
        assert 5 <= view["burst_sizes"][1] <= 18, msg  # 3 + the merge window's second
        assert 12 <= view["gaps"][1] <= 40, msg
    for i in (0, 1):
        assert abs(on["gaps"][i] - off["gaps"][i]) <= 9, msg
    assert abs(on["burst_sizes"][1] - off["burst_sizes"][1]) <= 3, msg


def seq(run: dict[str, Any]) -> str:
    """Which pod got each request (its last character), for failure messages."""
    return "".join(p[-1] for p in run["pods"])


def test_every_pod_bad_panics_as_in_envoy(runs: dict[str, Any], kernel: None) -> None:
    """Every `op` pod answers 500: the first ejected pod leaves the LB at once,
    the other (ejected within the merge window) a second later, when the LB
    sees 0 of 2 healthy (< 50 %): panic, both pods get requests again."""
    counts = {}
    for mode in ("off", "on"):
        res = runs[mode]["results"][N_ONE_BAD:N_ONE_BAD + N_ALL_BAD]
        pods = runs[mode]["pods"][N_ONE_BAD:N_ONE_BAD + N_ALL_BAD]
        assert all(r["status"] == 500 for r in res), (mode, res)
        for p in ("op-0", "op-1"):
            assert pods[22:].count(p) >= 2, (mode, seq(runs["off"]), seq(runs["on"]))
        counts[mode] = sorted(pods.count(p) for p in ("op-0", "op-1"))
    # one pod skipped for ~1 s, the other taking it all: the same split both ways
    assert all(abs(a - b) <= 4 for a, b in zip(counts["off"], counts["on"], strict=True)), \
        (counts, seq(runs["off"]), seq(runs["on"]))


def test_no_host_left_answers_as_envoy(runs: dict[str, Any], kernel: None) -> None:
    """Both `oq` pods fail and Istio's panic threshold is 0: once both are out
    of the LB (the second's ejection merged: 1 s later), Envoy answers 503 "no
    healthy upstream" itself (the app sees nothing) until a pod comes back
    (3 s after its ejection, at a tick); the kernel sends the same reply."""
    got = {}
    for mode in ("off", "on"):
        res = runs[mode]["results"][OQ]
        pods = runs[mode]["pods"][OQ]
        local = [i for i, r in enumerate(res) if r["status"] == 503]
        assert all(res[i]["body"] == NO_HEALTHY and pods[i] == "-" for i in local), (mode, res)
        assert all(r["status"] == 500 for i, r in enumerate(res) if i not in local), (mode, res)
        got[mode] = local
    msg = (got, seq(runs["off"])[OQ], seq(runs["on"])[OQ])
    assert len(got["off"]) >= 10 and len(got["on"]) >= 10, msg
    assert abs(len(got["on"]) - len(got["off"])) <= 9, msg
    assert abs(got["on"][0] - got["off"][0]) <= 4, msg  # the merge window: no tick in it
    for mode in ("off", "on"):  # a pod came back after the no-host stretch (what follows
        # depends on the phase of the interval ticks, which differs: docs, Limits)
        assert any(i not in got[mode] for i in range(got[mode][0], N_NONE)), msg


def test_route_timeouts_on_envoys_path_eject_as_in_envoy(runs: dict[str, Any], kernel: None) -> None:
    """`ot`'s requests all go to the client's sidecar and time out (300 ms):
    ejected after the third, then Envoy's 503 "no healthy upstream", with the
    fast path off (Envoy's detector) and on (the kernel's, fed by the
    sidecar's access log: the HCM's UT entry paired with the attempt's; the
    sidecar's own detector is off)."""
    want = [(504, "upstream request timeout")] * 3 + [(503, NO_HEALTHY)] * (N_TIMEOUT - 3)
    for mode in ("off", "on"):
        got = [(r["status"], r["body"]) for r in runs[mode]["results"][OT]]
        assert got == want, (mode, got)
    node = next(n for n in runs["on"]["dbg"]["nodes"] if n["pod"].startswith("client"))
    ot = node["outlier"]["outbound|9300||ot.default.svc.cluster.local"]
    assert ot["ejections"] == 1 and ot["active"] == 1, ot


def test_kernel_served_and_ejected(runs: dict[str, Any], kernel: None) -> None:
    node = next(n for n in runs["on"]["dbg"]["nodes"] if n["pod"].startswith("client"))
    fast = sum(c["requests"] for c in node["counters"] if c["outcome"] == "fast")
    envoy = sum(c["requests"] for c in node["counters"] if c["outcome"] == "envoy")
    replies = sum(c["requests"] for c in node["counters"] if c["outcome"] == "kernel_reply")
    total = N_ONE_BAD + N_ALL_BAD + N_NONE + N_TIMEOUT
    assert fast + replies >= total - N_ENVOY - 2, node["counters"]
    assert replies >= 1, node["counters"]  # "no healthy upstream" from the kernel
    assert N_ENVOY - 2 <= envoy <= N_ENVOY + 2, node["counters"]  # the punts
    od = node["outlier"]["outbound|9000||od.default.svc.cluster.local"]
    assert od["ejections"] >= 2 and od["unejections"] >= 2, od
    bad = [h for h in od["hosts"].values() if h["ejections"]]
    assert len(bad) == 1 and bad[0]["ejections"] >= 2, od
    # one detector: Envoy's responses counted by the kernel's (ALS), its
    # LB view published to Envoy's EDS at each change, and Envoy's own off
    assert od["envoy_counted"] >= N_OD_ENVOY - 2, od
    assert od["eds_publishes"] >= 4, od
    stats = runs["on"]["envoy_outlier_stats"]  # the exec worked and shows the cluster's stats
    od_stat = "cluster.outbound|9000||od.default.svc.cluster.local."
    assert stats.startswith("rc=0\n") and f"{od_stat}upstream_rq_total:" in stats, stats
    assert f"{od_stat}outlier_detection.ejections_enforced_total: 0" in stats \
        or f"{od_stat}outlier_detection." not in stats, stats
