"""benchmarks.meshconfig's fast-path probe: one deadline for all its waits."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks import load, meshconfig
from benchmarks.configs import Unavailable
from mesh import ready


def test_a_mesh_never_ready_is_reported_after_one_timeout(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """Each of the 3 tries waited up to 180 s: 9 minutes before the report."""
    now = [0.0]
    waits: list[tuple[float, bool]] = []

    def wait_ready(admin: str, client: str, every_node: bool, timeout: float) -> Any:
        waits.append((round(timeout, 3), every_node))
        now[0] += timeout  # never ready: it waits its whole timeout
        raise ready.NotReady("no node loaded for pod client-0", {})

    def run_wrk(*args: Any, **kw: Any) -> None:
        now[0] += 1.0  # the 1 s probe

    monkeypatch.setattr(meshconfig, "time", SimpleNamespace(monotonic=lambda: now[0]), raising=False)
    monkeypatch.setattr(ready, "wait_ready", wait_ready)
    monkeypatch.setattr(load, "run_wrk", run_wrk)
    cfg = meshconfig.MeshRunnerConfig(tmp_path, "envoy", "t")
    cfg.state = {"admin": "127.0.0.1:1", "pods": [{"service": "client", "name": "client-0",
                                                 "netns": "md-client"}]}
    downs: list[bool] = []
    monkeypatch.setattr(cfg, "counters", lambda: {"kernel_requests": 0})
    monkeypatch.setattr(cfg, "url", lambda *a: "http://198.18.0.1/")
    monkeypatch.setattr(cfg, "_agent_reasons", lambda: "")
    monkeypatch.setattr(cfg, "down", lambda: downs.append(True))
    with pytest.raises(Unavailable, match="served no request of 3 1 s probes"):
        cfg._check_fast_path()  # 3 tries, 180 s
    assert waits == [(180.0, True), (0.0, False), (0.0, False)]
    assert now[0] == 183.0 and downs == [True]
