"""A real Envoy with a static config, the slow path of the data-path kernel tests (K2).

Owner: K2. Callers: conftest.Envoy (the /deny policy), and through ResourcesEnvoy
test_delay, test_timeouts and test_redirect (their own routes in `listener_and_cluster`). The Envoy is the
child of the test process, so it lives no longer than the test; the caller's
fixture calls `close()`.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.procs import stop_process
from xds_server.ports import pick_free_port


class StaticEnvoy:
    """Envoy run on the config file `cfg` (YAML or JSON), listening on `port`;
    the constructor returns once that port accepts, or raises naming why."""

    def __init__(self, binary: str, cfg: Path, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        # --base-id: shared-memory names of its own, so Envoys of parallel
        # tests never meet
        self.proc = subprocess.Popen(
            [binary, "-c", str(cfg), "--disable-hot-restart", "--concurrency", "1",
             "-l", "warning", "--base-id", str(port)], stdout=subprocess.DEVNULL,
            stderr=open(log, "w"))  # noqa: SIM115
        try:
            self._wait_listening(30)
        except RuntimeError:
            self.close()
            raise

    def _wait_listening(self, secs: float) -> None:
        deadline = time.monotonic() + secs
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"envoy did not listen on {self.port} within {secs:.0f} s")

    def close(self) -> None:
        stop_process(self.proc)


Make = Callable[[int, int], tuple[dict[str, Any], dict[str, Any]]]  # (port, up_port) -> config


class ResourcesEnvoy(StaticEnvoy):
    """A real Envoy on a free port running `make(port, up_port)`'s listener and
    cluster, which it keeps (`.listener`, `.cluster`) for the split of the same
    config; config and log are `workdir`/envoy-NAME.*."""

    def __init__(self, binary: str, name: str,
                 make: Make, up_port: int, workdir: Path) -> None:
        port = pick_free_port()
        self.listener, self.cluster = make(port, up_port)
        cfg = write_json_config(workdir, name, self.listener, self.cluster)
        super().__init__(binary, cfg, port, workdir / f"envoy-{name}.log")


EnvoyMaker = Callable[[str, Make, int], ResourcesEnvoy]  # conftest's resources_envoy fixture


def write_json_config(workdir: Path, name: str, listener: dict[str, Any],
                      cluster: dict[str, Any]) -> Path:
    """`workdir`/envoy-NAME.json: an admin port, `listener` and `cluster`."""
    cfg = workdir / f"envoy-{name}.json"
    cfg.write_text(json.dumps({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": pick_free_port()}}},
        "static_resources": {"listeners": [listener], "clusters": [cluster]}}))
    return cfg


HCM_T = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3." \
        "HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def timed_routes(timed: str, default: bool = False) -> list[dict[str, Any]]:
    """Routes to cluster "up": /t with route timeout `timed`, /n with none (0s, as
    Istio sets it) and, with `default`, /d with Envoy's default (15 s)."""
    routes = [
        {"name": "timed", "match": {"prefix": "/t"}, "route": {"cluster": "up", "timeout": timed}},
        {"name": "none", "match": {"prefix": "/n"}, "route": {"cluster": "up", "timeout": "0s"}},
    ]
    if default:
        routes.append({"name": "dflt", "match": {"prefix": "/d"}, "route": {"cluster": "up"}})
    return routes


def listener_and_cluster(port: int, up_port: int, routes: list[dict[str, Any]],
                         http_filters: tuple[dict[str, Any], ...] = ()
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Listener "out" on 127.0.0.1:`port` (an HCM with `http_filters`, then the
    router; one virtual host "*" with `routes`) and cluster "up" (STATIC,
    127.0.0.1:`up_port`): what the differential tests give Envoy and the split."""
    listener = {"name": "out", "address": {"socket_address": {"address": "127.0.0.1",
                                                              "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {"@type": HCM_T, "stat_prefix": "out",
                                     "http_filters": [*http_filters, ROUTER],
                                     "route_config": {"name": "rc", "virtual_hosts": [
                                         {"name": "all", "domains": ["*"], "routes": routes}]}}}]}]}
    cluster = {"name": "up", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": "up", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": up_port}}}}]}]}}
    return listener, cluster
