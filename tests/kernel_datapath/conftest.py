"""Fixtures of the data-path kernel tests (K2): servers, a scoped cgroup, a real
Envoy as the slow path, and a loaded Datapath. Everything is torn down by the
fixtures even when a test fails."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from k2_envoy import EnvoyMaker, Make, ResourcesEnvoy, StaticEnvoy, pick_free_port
from k2_helpers import HttpServer, ScopedCgroup

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


class Envoy(StaticEnvoy):
    """A real Envoy (child of the test process): /deny -> 403 "RBAC: access denied"
    (the same policy the kernel tests give the fast path), everything else to `up_port`."""

    def __init__(self, binary: str, up_port: int, workdir: Path) -> None:
        port = pick_free_port()
        cfg = workdir / "envoy.yaml"
        cfg.write_text(ENVOY_YAML.format(admin=pick_free_port(), port=port, up=up_port))
        super().__init__(binary, cfg, port, workdir / "envoy.log")


@pytest.fixture
def upstream() -> Iterator[HttpServer]:
    s = HttpServer("upstream")
    yield s
    s.close()


@pytest.fixture
def echo() -> Iterator[Any]:
    """test_delay.EchoUpstream (records each request, answers it as JSON): the
    upstream of test_delay, test_hop and test_redirect's Envoy and fast path."""
    from test_delay import EchoUpstream

    s = EchoUpstream()
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
def resources_envoy(envoy_bin: str, tmp_path: Path) -> Iterator[EnvoyMaker]:
    """`start(name, make, up_port)`: a real Envoy running `make(port, up_port)`'s
    listener and cluster (k2_envoy.ResourcesEnvoy, files in tmp_path); every
    Envoy started is stopped at the test's end. The per-module Envoy fixtures
    of the differential tests (test_close, test_reset, ...) are one call of it;
    they take their upstream server's fixture before this one, so that the
    Envoy stops before its upstream (as their own teardown did)."""
    with contextlib.ExitStack() as stack:  # every Envoy closed even if one close raises

        def start(name: str, make: Make, up_port: int) -> ResourcesEnvoy:
            e = ResourcesEnvoy(envoy_bin, name, make, up_port, tmp_path)
            stack.callback(e.close)
            return e

        yield start


@pytest.fixture
def datapath(kernel: None):  # type: ignore[no-untyped-def]
    from fastpath.loader import Datapath

    dp = Datapath.load()
    yield dp
    dp.close()


@pytest.fixture
def agent(kernel: None, cgroup: ScopedCgroup, tmp_path: Path) -> Iterator[Any]:
    """An agent with the l7fp decision on `cgroup` (test_delay, test_timeouts;
    test_agent.py has its own, over both decisions)."""
    from test_agent import write_state

    from fastpath.agent import Agent

    state = tmp_path / "state.json"
    write_state(state, str(cgroup.path))
    a = Agent(state, decide="l7fp")
    a.start()
    yield a
    a.stop()
