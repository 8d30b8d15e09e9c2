"""Helpers of the split tests: echo upstreams and a real Envoy from a static bootstrap.

Each echo upstream answers every request with JSON {cluster, method, path,
headers}, so a test sees which cluster Envoy chose and what it forwarded.
Envoy is a child of the test process and is stopped by pid in teardown.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.classify import Resources
from fastpath.plan import (
    Cluster,
    Direction,
    HeaderValue,
    KernelPlan,
    ListenerPlan,
    Route,
    VirtualHost,
)
from fastpath.split import plan_of
from tests.support.procs import stop_process
from xds_server.ports import free_ports  # noqa: F401  (tests import it from here)

CLUSTERS = ("c0", "c1", "c2")


def _handler(cluster: str) -> type[BaseHTTPRequestHandler]:
    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self) -> None:
            n = int(self.headers.get("content-length") or 0)
            if n:
                self.rfile.read(n)
            body = json.dumps({"cluster": cluster, "method": self.command, "path": self.path,
                               "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _reply

        def log_message(self, *args: Any) -> None:
            pass

    return Echo


@contextlib.contextmanager
def echo_server(name: str = "echo") -> Iterator[int]:
    """One loopback echo server (its port) answering every request with JSON
    {cluster: name, method, path, headers: {lower-case name: value}}: what an
    upstream behind Envoy, or behind the kernel, received."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(name))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def prefix_router(listen: int, clusters: list[dict[str, Any]]) -> dict[str, Any]:
    """A static bootstrap: one listener on 127.0.0.1:`listen` routing `/NAME...`
    to cluster NAME, for each of `clusters` (which it also holds)."""
    return {"static_resources": {
        "listeners": [{"name": "lb", "address": {"socket_address": {"address": "127.0.0.1",
                                                                    "port_value": listen}},
                       "filter_chains": [{"filters": [{
                           "name": "envoy.filters.network.http_connection_manager",
                           "typed_config": {
                               "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                        "http_connection_manager.v3.HttpConnectionManager",
                               "stat_prefix": "lb",
                               "route_config": {"virtual_hosts": [{
                                   "name": "all", "domains": ["*"],
                                   "routes": [{"match": {"prefix": f"/{c['name']}"},
                                               "route": {"cluster": c["name"]}} for c in clusters]}]},
                               "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                                   "@type": "type.googleapis.com/envoy.extensions.filters.http."
                                            "router.v3.Router"}}]}}]}]}],
        "clusters": clusters}}


@pytest.fixture(scope="session")
def echo_upstreams() -> Iterator[dict[str, int]]:
    """Cluster name -> port of a loopback echo server answering with that name."""
    servers, ports = [], {}
    for name in CLUSTERS:
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(name))
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        ports[name] = srv.server_address[1]
    yield ports
    for srv in servers:
        srv.shutdown()
        srv.server_close()


class EnvoyProc:
    """A real Envoy on a static bootstrap; `stop()` kills it by pid."""

    def __init__(self, envoy_bin: str, bootstrap: dict[str, Any], ports: list[int]) -> None:
        self.dir = tempfile.mkdtemp(prefix="l7fp-split-")
        path = os.path.join(self.dir, "bootstrap.json")
        with open(path, "w") as f:
            json.dump(bootstrap, f)
        self.log = open(os.path.join(self.dir, "envoy.log"), "w")
        self.proc = subprocess.Popen(
            [envoy_bin, "-c", path, "--base-id", str(ports[0]), "--concurrency", "1",
             "--disable-hot-restart", "-l", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait(ports)
        except BaseException:  # not up: leave no Envoy and no directory behind
            self.stop()
            raise

    def _wait(self, ports: list[int]) -> None:
        deadline = time.monotonic() + 30
        for port in ports:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"envoy exited: {open(self.log.name).read()[-2000:]}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"envoy not listening on {port}") from None
                    time.sleep(0.05)

    def stop(self) -> None:
        """Kill Envoy by its pid and remove its directory (bootstrap, log)."""
        stop_process(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def envoy_validate(envoy_bin: str, bootstrap: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate` on ``bootstrap``: does Envoy accept the config?"""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="l7fp-split-", delete=False) as f:
        json.dump(bootstrap, f)
    try:
        return subprocess.run([envoy_bin, "--mode", "validate", "-c", f.name, "-l", "error"],
                              capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(f.name)


def http_request(port: int, method: str, path: str, host: str, headers: dict[str, str],
                 address: str = "127.0.0.1", timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def bootstrap_plan(node: str, boot: dict[str, Any], executable: bool = True) -> KernelPlan:
    """The KernelPlan of a static bootstrap's listeners and clusters (either key
    spelling), as the split makes it of the config the test's Envoy runs."""
    sr = boot.get("staticResources", boot.get("static_resources", {}))
    listeners = [em.to_json(em.parse(em.LISTENER, x)) for x in sr.get("listeners", [])]
    clusters = [em.to_json(em.parse(em.CLUSTER, x)) for x in sr.get("clusters", [])]
    return plan_of(node, Resources(listeners, {}, clusters, {}), executable=executable)


def listener_plan(routes: tuple[Route, ...], clusters: tuple[Cluster, ...] = (),
                  vh_adds: tuple[HeaderValue, ...] = ()) -> KernelPlan:
    """Plan "n"/"v1": one outbound listener "l" (127.0.0.1:80) whose one virtual
    host "vh" (domains "*", request headers `vh_adds`) has `routes`, and
    `clusters`. What the sans-I/O tests (mirror, hop, reference model) give
    decide() and decide_datapath() when only the routes matter."""
    vh = VirtualHost("vh", ("*",), routes, request_headers_to_add=vh_adds)
    return KernelPlan("n", "v1", (ListenerPlan("l", "127.0.0.1", 80, Direction.OUTBOUND, (vh,)),),
                      clusters)
