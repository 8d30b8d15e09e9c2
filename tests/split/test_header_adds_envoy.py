"""Route header adds and removals as Envoy 1.40 takes them.

An empty value: Envoy skips an add without
`keep_empty_value` (the upstream sees no line, and a client's header of that
name is left as it was, also under an overwrite action) and adds `name: ` with
it; the split's plan and the reference model (the kernel's adds) do the same
(fastpath.classify_route._headers). Adding or removing `host` or a
pseudo-header: Envoy rejects the config, and the split says so."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.plan import Verdict
from fastpath.reference import Request, decide
from fastpath.split import split_snapshot
from tests.split.harness import EnvoyProc, echo_server, envoy_validate, free_ports
from tests.split.test_hcm_limits_envoy import cluster, listener, verdicts

pytestmark = [pytest.mark.envoy]

ADDS = [{"header": {"key": "x-empty", "value": ""}},
        {"header": {"key": "x-over", "value": ""}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
        {"header": {"key": "x-keep", "value": ""}, "keep_empty_value": True},
        {"header": {"key": "x-full", "value": "v"}}]
CLIENT = [("x-over", "client")]


def with_adds(port: int) -> dict[str, Any]:
    lis = listener("l", port, {})
    route = lis["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
    route["request_headers_to_add"] = ADDS
    return lis


@pytest.fixture(scope="module")
def upstream_saw(envoy_bin: str) -> Iterator[list[tuple[str, str]]]:
    port, = free_ports(1)
    with echo_server() as up:
        proc = EnvoyProc(envoy_bin, {"static_resources": {"listeners": [with_adds(port)],
                                                          "clusters": [cluster("l", up, {})]}}, [port])
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/", headers=dict(CLIENT))
            r = conn.getresponse()
            assert r.status == 200
            yield list(json.loads(r.read())["headers"].items())
            conn.close()
        finally:
            proc.stop()


def test_empty_values_as_envoy(upstream_saw: list[tuple[str, str]]) -> None:
    names = [k for k, _ in upstream_saw]
    assert "x-empty" not in names and ("x-keep", "") in upstream_saw and ("x-full", "v") in upstream_saw
    assert ("x-over", "client") in upstream_saw, upstream_saw  # not overwritten with ""
    plan = split_snapshot("n", {em.LISTENER: [em.parse(em.LISTENER, with_adds(8080))],
                                em.CLUSTER: [em.parse(em.CLUSTER, cluster("l", 9, {}))]}).plan
    d = decide(plan, "l", Request("GET", "/", "web", tuple(CLIENT)))
    assert d.kind == "forward", d
    assert [k for k, _ in d.add_headers] == ["x-keep", "x-full"], d.add_headers


@pytest.mark.parametrize("field, name, words", [
    ("request_headers_to_add", "host", "may not be modified"),
    ("request_headers_to_add", ":path", "may not be modified"),
    ("request_headers_to_remove", "host", "may not be removed"),
    ("request_headers_to_remove", ":authority", "may not be removed"),
])
def test_host_and_pseudo_headers_are_invalid(envoy_bin: str, field: str, name: str, words: str) -> None:
    """Envoy rejects a route that adds or removes them; the split says so (ENVOY,
    with Envoy's words) instead of a KERNEL route that sets Host."""
    lis = listener("l", 1, {})
    route = lis["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
    route[field] = [{"header": {"key": name, "value": "x"}}] if field.endswith("add") else [name]
    boot = {"static_resources": {"listeners": [lis], "clusters": [cluster("l", 9, {})]}}
    proc = envoy_validate(envoy_bin, boot)
    assert proc.returncode != 0 and f":-prefixed or host headers {words}" in proc.stdout + proc.stderr
    (v, why), = verdicts(lis, cluster("l", 9, {}))
    assert v is Verdict.ENVOY and f"Envoy rejects it (\":-prefixed or host headers {words}\")" in why, why
