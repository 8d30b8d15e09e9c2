"""Fixtures of the data-path kernel tests (K2): servers, a scoped cgroup, a real
Envoy as the slow path, and a loaded Datapath. Everything is torn down by the
fixtures even when a test fails."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from k2_helpers import HttpServer, ScopedCgroup

from tests.support.procs import stop_process

ENVOY_YAML = """\
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: slow
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: slow
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              response_headers_to_add:
              - header: {{key: x-via, value: envoy}}
              routes:
              - match: {{prefix: "/deny"}}
                direct_response: {{status: 403, body: {{inline_string: "RBAC: access denied"}}}}
              - match: {{prefix: "/"}}
                route: {{cluster: up}}
  clusters:
  - name: up
    type: STATIC
    load_assignment:
      cluster_name: up
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {up}}}}}}}
"""


def pick_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Envoy:
    """A real Envoy (child of the test process): /deny -> 403 "RBAC: access denied"
    (the same policy the kernel tests give the fast path), everything else to `up_port`."""

    def __init__(self, binary: str, up_port: int, workdir: Path) -> None:
        self.port = pick_free_port()
        admin = pick_free_port()
        cfg = workdir / "envoy.yaml"
        cfg.write_text(ENVOY_YAML.format(admin=admin, port=self.port, up=up_port))
        self.log = workdir / "envoy.log"
        self.proc = subprocess.Popen(
            [binary, "-c", str(cfg), "--disable-hot-restart", "--concurrency", "1",
             "-l", "warning"], stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        self.close()
        raise RuntimeError("envoy did not listen within 30 s")

    def close(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def upstream() -> Iterator[HttpServer]:
    s = HttpServer("upstream")
    yield s
    s.close()


@pytest.fixture
def cgroup(kernel: None, request: pytest.FixtureRequest) -> Iterator[ScopedCgroup]:
    cg = ScopedCgroup(request.node.name[:20].replace("[", "-").replace("]", ""))
    yield cg
    cg.close()


@pytest.fixture
def envoy(envoy_bin: str, upstream: HttpServer, tmp_path: Path) -> Iterator[Envoy]:
    e = Envoy(envoy_bin, upstream.port, tmp_path)
    yield e
    e.close()


@pytest.fixture
def datapath(kernel: None):  # type: ignore[no-untyped-def]
    from fastpath.loader import Datapath

    dp = Datapath.load()
    yield dp
    dp.close()
