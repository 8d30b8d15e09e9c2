"""`l7fp bench --quick` end to end (the CI guard that the harness cannot rot), and Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import cgroups
from benchmarks.configs import NAMES

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.kernel, pytest.mark.mesh, pytest.mark.envoy, pytest.mark.slow]


@pytest.mark.timeout(300)
def test_quick_run_produces_all_configurations_report_and_plots(kernel: None,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "res"
    proc = subprocess.Popen([sys.executable, "-m", "xds_server", "bench", "--quick", "--out",
                             str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _, stderr = proc.communicate(timeout=220)
    finally:
        if proc.poll() is None:  # Ctrl-C first: the harness tears its meshes down (a kill
            proc.send_signal(signal.SIGINT)  # left the l7fp mesh's daemon running)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert "[1/" in stderr  # progress lines
    doc = json.loads((out / "results.json").read_text())
    status = {c["name"]: c for c in doc["configurations"]}
    assert set(status) == set(NAMES)
    for name in NAMES:
        assert status[name]["status"] == "ok", status[name]
        runs = [r for r in doc["runs"] if r["configuration"] == name]
        assert runs and all("error" not in r for r in runs)
        for r in runs:
            assert r["p50_us"] > 0 and r["p99_us"] >= r["p50_us"] and r["rps"] > 0
            assert r["cpu_s_per_1k"] > 0 and r["requests"] > 0
            assert set(r) >= {"configuration", "scenario", "connections", "p50_us", "p90_us",
                              "p99_us", "rps", "cpu_s_per_1k", "kernel_share"}
    assert any(r["configuration"] == "sidecar-l4" and r["counters"]["redirected_msgs"] > 0
               for r in doc["runs"])
    # the l7fp figures are the kernel's: on the leaf most requests take the fast path
    assert any(r["configuration"] == "l7fp" and r["scenario"] == "leaf" and r["kernel_share"] > 0.5
               for r in doc["runs"])
    assert doc["machine"]["cores"] and "1.40" in doc["machine"]["envoy"]
    text = (out / "report.md").read_text()
    for name in NAMES:
        assert f"`{name}`" in text
    assert "## leaf, 1 connection(s)" in text
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 3 and all((out / p).stat().st_size > 1000 for p in pngs)
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"l7fp-bench-p{proc.pid}-" not in leftovers
    assert not (cgroups.bench_root() / f"p{proc.pid}").exists()


@pytest.mark.timeout(120)
def test_ctrl_c_tears_everything_down(kernel: None, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks", "--quick", "--scenario", "leaf",
                             "--configurations", "no-mesh,sidecar", "--duration", "5",
                             "--out", str(tmp_path)], cwd=REPO, stderr=subprocess.PIPE,
                            text=True)
    tag = f"l7fp-bench-p{proc.pid}-"
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line or line.startswith("[1/"):
                break
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert tag in names  # the meshes were up
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
        assert rc == 130, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tag not in names
    assert not (cgroups.bench_root() / f"p{proc.pid}").exists()
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["interrupted"] is True
