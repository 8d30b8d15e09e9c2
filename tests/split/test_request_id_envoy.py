"""x-forwarded-proto and x-request-id: the model (fastpath.request_id, what
bpf_src/dp_xrid.h does) against a real Envoy, per HCM setting.

One Envoy, one listener per setting, one upstream recording the heads. A
listener the split keeps KERNEL must add exactly the model's lines, right
after the client's headers (a client's own line kept as sent); a listener
with a setting the kernel does not reproduce must be ENVOY with that reason,
and Envoy must indeed do something else there for one of the requests.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fastpath import envoy_model as em
from fastpath.plan import Verdict
from fastpath.request_id import UUID4, UUID4_PATTERN, added_headers
from fastpath.split import split_snapshot
from tests.kernel_datapath.k2_http import ThreadedServer, recv_head
from tests.support.procs import stop_process
from xds_server.ports import pick_free_port

pytestmark = pytest.mark.envoy

HCM_T = "type.googleapis.com/" + em.HCM
UUID_T = "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig"
# listener name -> (HCM settings, the split's reason, or "" for KERNEL)
SETTINGS: dict[str, tuple[dict[str, Any], str]] = {
    "default": ({}, ""),
    "explicit": ({"generate_request_id": True, "preserve_external_request_id": True,
                  "request_id_extension": {"typed_config": {"@type": UUID_T}}}, ""),
    "nopack": ({"tracing": {}, "request_id_extension": {"typed_config": {
        "@type": UUID_T, "pack_trace_reason": False}}}, ""),
    "ura": ({"use_remote_address": True}, "use_remote_address"),
    "nogen": ({"generate_request_id": False}, "generate_request_id false"),
    "resp": ({"always_set_request_id_in_response": True}, "always_set_request_id_in_response"),
    "nosample": ({"tracing": {}, "request_id_extension": {"typed_config": {
        "@type": UUID_T, "use_request_id_for_trace_sampling": False}}}, ""),
    # the "xff" request is internal there (use_remote_address false: by the
    # x-forwarded-for address the client sends, which the reason says): Envoy
    # adds x-envoy-internal: true (and would honour its x-envoy-* headers)
    "internal": ({"internal_address_config": {"cidr_ranges": [
        {"address_prefix": "127.0.0.1", "prefix_len": 32}]}},
        "internal_address_config (requests whose peer (use_remote_address) or sole "
        "x-forwarded-for address (else; the client sends it) is in its ranges are internal"),
}
# case -> the client's header lines
REQUESTS = {"none": [], "rid": [("X-Request-Id", "client-id-1")],
            "xfp": [("x-forwarded-proto", "https")],
            "both": [("x-forwarded-proto", "https"), ("x-request-id", "0")],
            "xff": [("x-forwarded-for", "127.0.0.1")]}


class Recorder(ThreadedServer):
    """The upstream: records each request head (lines after the request line),
    by its path; answers 200 "ok". Closed by the test's finally."""

    def __init__(self) -> None:
        self.heads: dict[str, list[tuple[str, str]]] = {}
        super().__init__()

    def _serve(self, c: socket.socket) -> None:
        buf = b""
        with c:
            while (got := recv_head(c, buf)) is not None:
                head, buf = got
                line, *rest = head.decode("latin-1").split("\r\n")
                self.heads[line.split()[1]] = [(k.lower(), v.strip()) for k, _, v in
                                               (x.partition(":") for x in rest)]
                c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


def _listener(name: str, port: int, hcm: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager", "typed_config": {
                    "@type": HCM_T, "stat_prefix": name, **hcm, "http_filters": [{
                        "name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    "route_config": {"name": f"rc-{name}", "virtual_hosts": [{
                        "name": "all", "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]}]}}}]}]}


def _exchange(port: int, path: str, lines: list[tuple[str, str]]) -> dict[str, str]:
    """One GET through Envoy: the response's headers (lower-case names)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in lines)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(f"GET {path} HTTP/1.1\r\nHost: svc\r\nx-a: 1\r\n{extra}\r\n".encode())
        resp = b""
        while b"\r\n\r\nok" not in resp:
            d = c.recv(4096)
            if not d:
                break
            resp += d
    return {k.lower(): v.strip() for k, _, v in
            (x.partition(":") for x in resp.decode("latin-1").split("\r\n\r\n")[0].split("\r\n")[1:])}


def test_kernel_listeners_add_what_envoy_adds(envoy_bin: str, tmp_path: Path) -> None:
    up = Recorder()
    ports = {name: pick_free_port() for name in SETTINGS}
    listeners = [_listener(n, ports[n], hcm) for n, (hcm, _) in SETTINGS.items()]
    cluster = {"name": "up", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": "up", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": up.port}}}}]}]}}
    plan = split_snapshot("n", {em.LISTENER: [em.parse(em.LISTENER, x) for x in listeners],
                                em.CLUSTER: [em.parse(em.CLUSTER, cluster)]}).plan
    verdicts = {lp.name: (lp.verdict, lp.reason) for lp in plan.listeners}
    for name, (_, why) in SETTINGS.items():  # the split's side
        assert (verdicts[name][0] is Verdict.KERNEL) == (not why), verdicts[name]
        assert why in verdicts[name][1], verdicts[name]
    cfg = tmp_path / "envoy.json"
    cfg.write_text(json.dumps({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": pick_free_port()}}},
        "static_resources": {"listeners": listeners, "clusters": [cluster]}}))
    proc = subprocess.Popen([envoy_bin, "-c", str(cfg), "--disable-hot-restart", "--concurrency", "1",
                             "-l", "warning", "--base-id", str(ports["default"])],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "envoy.log", "w"))  # noqa: SIM115
    try:
        _wait(ports["nosample"], proc, tmp_path / "envoy.log")
        responses = {(n, case): _exchange(ports[n], f"/{n}/{case}", lines)
                     for n in SETTINGS for case, lines in REQUESTS.items()}
        time.sleep(0.1)
    finally:
        stop_process(proc)
        up.close()
    differs = {n: False for n in SETTINGS}
    for (n, case), resp in responses.items():
        sent = [(k.lower(), v) for k, v in [("host", "svc"), ("x-a", "1"), *REQUESTS[case]]]
        want = sent + list(added_headers(tuple(sent)))
        got = [(k, v) for k, v in up.heads[f"/{n}/{case}"] if k != "x-envoy-expected-rq-timeout-ms"]
        same = len(got) == len(want) and "x-request-id" not in resp and all(
            gk == wk and (gv == wv or (wv == UUID4_PATTERN and UUID4.fullmatch(gv) is not None))
            for (gk, gv), (wk, wv) in zip(got, want, strict=False))
        if not SETTINGS[n][1]:
            assert same, (n, case, got, want, resp)
        differs[n] |= not same
    assert differs == {n: bool(why) for n, (_, why) in SETTINGS.items()}, differs


def _wait(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"envoy exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"envoy did not listen on {port} within 30 s")
