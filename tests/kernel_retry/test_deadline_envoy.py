"""The deadline cases' routes on a plain real Envoy (no sidecar behind it).

test_retry_onoff.py (test_deadline_*) compares the mesh with the fast path off
and on; there the destination's inbound sidecar strips
x-envoy-expected-rq-timeout-ms before the app (its HCM deems 198.18/15
external), so only the kernel run shows the header. Here one Envoy 1.40 with
the same two `/d` routes (policies.yaml) sends straight to retry_app.py: the
same answers and attempts as deadline_cases.CASES, and each attempt's header
follows the rule the kernel path is checked against (`follows_envoy`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from deadline_cases import answer_problem, follows_envoy, gen_requests
from support.procs import stop_process

from xds_server.ports import pick_free_port

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(120)]

HERE = Path(__file__).resolve().parent


def envoy_config(port: int, app_port: int) -> dict[str, Any]:
    pol = yaml.safe_load((HERE / "policies.yaml").read_text())
    vhosts = []
    for svc in ("flaky", "solo"):
        route = pol[svc]["outbound"]["routes"][0]
        vhosts.append({"name": svc, "domains": [f"{svc}:*", svc],
                       "routes": [{"match": route["match"],
                                   "route": {**route["route"], "cluster": "app"}}]})
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network."
                    "http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "d", "route_config": {"name": "d", "virtual_hosts": vhosts},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    addr = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    app = {"socket_address": {"address": "127.0.0.1", "port_value": app_port}}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                     "port_value": pick_free_port()}}},
            "static_resources": {
                "listeners": [{"name": "d", "address": addr, "filter_chains": [{"filters": [
                    {"name": "envoy.filters.network.http_connection_manager",
                     "typed_config": hcm}]}]}],
                "clusters": [{"name": "app", "type": "STATIC", "connect_timeout": "1s",
                              "load_assignment": {"cluster_name": "app", "endpoints": [
                                  {"lb_endpoints": [{"endpoint": {"address": app}}]}]}}]}}


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} not listening after 30 s")


@pytest.fixture
def envoy_and_app(envoy_bin: str, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    logs = tmp_path / "logs"
    logs.mkdir()
    app_port, port = pick_free_port(), pick_free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "retry_app.py"), "--port", str(app_port),
             "--log-dir", str(logs)], env={"POD_NAME": "app", "PATH": "/usr/bin:/bin"},
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "app.log", "w")))  # noqa: SIM115
        wait_port(app_port, procs[0], tmp_path / "app.log")
        cfg = tmp_path / "envoy.json"
        cfg.write_text(json.dumps(envoy_config(port, app_port)))
        procs.append(subprocess.Popen(
            [envoy_bin, "-c", str(cfg), "--disable-hot-restart", "--concurrency", "1",
             "-l", "warning", "--base-id", str(port)], stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "envoy.log", "w")))  # noqa: SIM115
        wait_port(port, procs[1], tmp_path / "envoy.log")
        yield port, logs
    finally:
        for p in reversed(procs):
            stop_process(p)


def test_plain_envoy_answers_and_expected_timeout(envoy_and_app: tuple[int, Path]) -> None:
    sys.path.insert(0, str(HERE))
    import driver1w

    port, logs = envoy_and_app
    reqs = gen_requests()
    results = []
    for r in reqs:
        results.append(driver1w.send({**r, "vip": "127.0.0.1", "port": port}))
    attempts: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for ln in (logs / "app.log").read_text().splitlines():
        rid, at, expected = ln.split()
        attempts[rid].append((int(at[1:]), expected))
    print("plain Envoy:", [(r["status"], round(r["secs"], 2)) for r in results],
          {rid: [e for _, e in sorted(v)] for rid, v in attempts.items()})
    for req, res in zip(reqs, results, strict=True):
        got = sorted(attempts[req["headers"]["x-k3-id"]])
        why = answer_problem(req, res, len(got)) or follows_envoy(got, req["svc"])
        assert not why, (req["headers"], why, res, got)
