"""The HTTP methods the kernel forwards are Envoy's: what Envoy 1.40's HTTP/1
codec accepts is measured with the binary and compared with the reference
model's lists (fastpath.reference.ENVOY_METHODS / KERNEL_METHODS, which
bpf_src/include/l7fp_http.h l7fp_known_method spells out; the kernel's side:
tests/kernel_decide/test_parser.py::test_methods_are_envoys).

Envoy answers 400 itself to a method it does not know ("FOO", "QUERY") and to
one not in upper case; a kernel that forwarded those would answer where Envoy
refuses (found by test_corpus_differential.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from fastpath.reference import ENVOY_METHODS, KERNEL_METHODS
from tests.split.harness import EnvoyProc, free_ports

pytestmark = [pytest.mark.envoy]

# Envoy's list, near misses of it, and words no parser knows
CANDIDATES = sorted(ENVOY_METHODS | {
    "FOO", "ABC", "QUERY", "ABCDEFGH", "PRI", "GETX", "XGET", "G", "A", "M-SEARCH", "get", "Get",
    "post", "PROPFINDX", "UNLOCKED", "MKCALENDARS"})


@pytest.fixture(scope="module")
def envoy_port(envoy_bin: str) -> Iterator[int]:
    port, admin = free_ports(2)
    boot = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [{
            "name": "methods",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                             "http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "methods",
                    "route_config": {"virtual_hosts": [{
                        "name": "all", "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"},
                                    "direct_response": {"status": 200,
                                                        "body": {"inline_string": "ok"}}}]}]},
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                }}]}],
        }]},
    }
    envoy = EnvoyProc(envoy_bin, boot, [port])
    try:
        yield port
    finally:
        envoy.stop()


def status_of(port: int, method: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"{method} /x HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n".encode())
        line = b""
        while b"\r\n" not in line:
            chunk = s.recv(256)
            if not chunk:
                break
            line += chunk
    return int(line.split(b" ", 2)[1])


def test_envoy_accepts_exactly_the_models_methods(envoy_port: int) -> None:
    got = {m: status_of(envoy_port, m) for m in CANDIDATES}
    assert set(got.values()) <= {200, 400}, got
    accepted = {m for m, status in got.items() if status == 200}
    # CONNECT to an origin-form target is a 400 of its own (no authority); the
    # kernel never forwards CONNECT (L7FP_R_UPGRADE)
    assert accepted == ENVOY_METHODS - {"CONNECT"}, (
        f"Envoy accepts {sorted(accepted - ENVOY_METHODS)} the model lacks; "
        f"refuses {sorted(ENVOY_METHODS - {'CONNECT'} - accepted)} the model lists")
    assert KERNEL_METHODS <= accepted | {"CONNECT"}
    assert {m for m in accepted if len(m) <= 8} == KERNEL_METHODS - {"CONNECT"}
