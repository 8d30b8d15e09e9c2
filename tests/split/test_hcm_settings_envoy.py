"""HCM settings that change what a request gets from Envoy 1.40 (the route, the
headers the upstream sees, the headers of Envoy's replies), measured with the
binary, and the split's verdict on the same listener: ENVOY with the setting,
KERNEL without (fastpath.classify._hcm_reasons).

Each listener has a virtual host `web` (a redirect on /redir, a forward on the
rest) and one `other` (a direct response). Settings whose effect is only the
case of header names (header_key_format) are not semantic (Envoy lower-cases
names by default, the kernel forwards them as sent) and are not here."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fastpath.plan import Verdict
from tests.split.harness import EnvoyProc, echo_server, free_ports
from tests.split.test_hcm_limits_envoy import cluster, listener, verdicts

pytestmark = [pytest.mark.envoy]

Answer = tuple[int, dict[str, str], dict[str, Any]]  # status, reply headers, upstream's view
# name: (HCM settings, request (host, path), what Envoy does with it, reason words)
CASES: dict[str, tuple[dict[str, Any], tuple[str, str], Callable[[Answer], bool], str]] = {
    "strip_dot": ({"strip_trailing_host_dot": True}, ("web.", "/"),
                  lambda a: a[0] == 200 and a[2].get("host") == "web", "strip_trailing_host_dot"),
    "xf_port": ({"append_x_forwarded_port": True}, ("web", "/"),
                lambda a: a[0] == 200 and "x-forwarded-port" in a[2], "append_x_forwarded_port"),
    "proxy_status": ({"proxy_status_config": {}}, ("nowhere", "/"),
                     lambda a: a[0] == 404 and "proxy-status" in a[1], "proxy_status_config"),
    "scheme": ({"scheme_header_transformation": {"scheme_to_overwrite": "https"}}, ("web", "/redir"),
               lambda a: a[0] == 301 and a[1].get("location", "").startswith("https://"),
               "scheme_to_overwrite"),
    "scheme_upstream": ({"scheme_header_transformation": {"scheme_to_overwrite": "https"}}, ("web", "/"),
                        lambda a: a[2].get("x-forwarded-proto") == "https", "scheme_to_overwrite"),
}


def web_listener(name: str, port: int, hcm: dict[str, Any]) -> dict[str, Any]:
    lis = listener(name, port, hcm)
    lis["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"] = [
        {"name": "web", "domains": ["web"], "routes": [
            {"match": {"prefix": "/redir"}, "redirect": {"path_redirect": "/x"}},
            {"match": {"prefix": "/"}, "route": {"cluster": name, "timeout": "0s"}}]},
        {"name": "other", "domains": ["other"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 418}}]}]
    return lis


def ask(port: int, host: str, path: str) -> Answer:
    """One raw request (Host exactly as given); Envoy's status, reply headers
    and, for a forward, the headers the upstream saw."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536) or b"\r\n\r\n"
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        hdrs = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        while len(body) < int(hdrs.get("content-length", 0)):
            body += s.recv(65536)
    status = int(lines[0].split()[1])
    return status, hdrs, json.loads(body)["headers"] if status == 200 and body else {}


@pytest.fixture(scope="module")
def envoy(envoy_bin: str) -> Iterator[dict[str, int]]:
    ports = free_ports(len(CASES) + 1)
    names = ["default", *CASES]
    hcms = {"default": {}, **{n: c[0] for n, c in CASES.items()}}
    with echo_server() as up:
        boot = {"static_resources": {
            "listeners": [web_listener(n, p, hcms[n]) for n, p in zip(names, ports, strict=True)],
            "clusters": [cluster(n, up, {}) for n in names]}}
        proc = EnvoyProc(envoy_bin, boot, ports)
        try:
            yield dict(zip(names, ports, strict=True))
        finally:
            proc.stop()


@pytest.mark.parametrize("case", sorted(CASES))
def test_envoy_differs_and_the_verdict_is_envoy(envoy: dict[str, int], case: str) -> None:
    hcm, (host, path), differs, words = CASES[case]
    assert not differs(ask(envoy["default"], host, path))  # without the setting: as the kernel does
    got = ask(envoy[case], host, path)
    assert differs(got), (case, got)
    web = verdicts(web_listener(case, 1, hcm), cluster(case, 1, {}))  # the `web` virtual host's routes
    assert all(v is Verdict.ENVOY and words in why for v, why in web), web
    assert all(v is Verdict.KERNEL for v, _ in verdicts(web_listener("d", 1, {}), cluster("d", 1, {})))
