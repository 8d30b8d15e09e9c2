"""Test harness: run istiod-style generated config in a real Envoy on loopback.

The generated resources are made static (EDS -> inline endpoints, RDS -> inline
route tables) so one Envoy can run them without an ADS server, and the
bind_to_port=false listeners are bound to free loopback ports so a test can
send requests to them. Backends are small HTTP servers answering with their
pod name. Used by tests/istio/test_envoy_behaviour.py only.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.procs import stop_process
from xds_server.istio.sidecar import CLUSTER, ENDPOINT, LISTENER, ROUTE


class Backend:
    """An HTTP server on (ip, port) answering `NAME PATH`; `/flaky` fails twice with 503."""

    def __init__(self, name: str, ip: str, port: int) -> None:
        self.name = name
        self.hits = 0
        self.flaky_left = 2
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.hits += 1
                if self.path.startswith("/flaky") and outer.flaky_left > 0:
                    outer.flaky_left -= 1
                    code, body = 503, b"flaky"
                else:
                    code, body = 200, f"{outer.name} {self.path}".encode()
                self.send_response(code)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((ip, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def make_static(res: dict[str, list[dict[str, Any]]], ports: dict[str, int]) -> dict[str, Any]:
    """Bootstrap dict from generated resources; `ports` maps listener name -> loopback port."""
    res = copy.deepcopy(res)
    cla = {c["clusterName"]: c for c in res[ENDPOINT]}
    rcs = {r["name"]: r for r in res[ROUTE]}
    for c in res[CLUSTER]:
        if c.get("type") == "EDS":
            c["type"] = "STATIC"
            c.pop("edsClusterConfig")
            c["loadAssignment"] = cla[c["name"]]
    listeners = []
    for lis in res[LISTENER]:
        if lis["name"] not in ports:
            continue
        lis["address"]["socketAddress"] = {"address": "127.0.0.1", "portValue": ports[lis["name"]]}
        lis.pop("bindToPort", None)
        lis.pop("useOriginalDst", None)
        lis.pop("listenerFilters", None)
        for chain in lis["filterChains"]:
            chain.pop("filterChainMatch", None)  # no iptables: no original destination port
            for f in chain["filters"]:
                hcm = f["typedConfig"]
                if "rds" in hcm:
                    hcm["routeConfig"] = rcs[hcm.pop("rds")["routeConfigName"]]
        if lis["name"] == "virtualInbound":
            lis["filterChains"] = lis["filterChains"][:1]
        listeners.append(lis)
    return {"staticResources": {"listeners": listeners, "clusters": res[CLUSTER]}}


class Envoy:
    """A real Envoy child process running a static bootstrap (JSON)."""

    def __init__(self, binary: str, bootstrap: dict[str, Any], admin_port: int) -> None:
        bootstrap = dict(bootstrap)
        bootstrap["admin"] = {"address": {"socketAddress": {"address": "127.0.0.1",
                                                            "portValue": admin_port}}}
        self.dir = tempfile.mkdtemp(prefix="l7fp-istio-")
        path = os.path.join(self.dir, "bootstrap.json")
        with open(path, "w") as f:
            json.dump(bootstrap, f)
        self.log = open(os.path.join(self.dir, "envoy.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "-c", path, "--base-id", str(admin_port), "--log-level", "warning",
             "--disable-hot-restart"], stdout=self.log, stderr=subprocess.STDOUT)
        self.admin = admin_port
        try:
            self._wait_ready()
        except BaseException:  # not up: leave no Envoy and no directory behind
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited: {open(self.log.name).read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"envoy not ready: {open(self.log.name).read()[-3000:]}")

    def stop(self) -> None:
        """Kill Envoy by its pid and remove its directory (bootstrap, log)."""
        stop_process(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def request(port: int, path: str, host: str, method: str = "GET",
            headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 headers={"Host": host, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
