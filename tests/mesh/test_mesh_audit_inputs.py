"""`l7fp mesh audit` on bad answers and stuck requests, without a mesh.

The pod client (mesh.audit_client) against a real loopback server that
trickles its response; the host side (mesh.audit_pod.PodClient) with a real
subprocess standing in for the client in a pod (no netns needed for the
logic around it); the control plane's bad answers from a real HTTP server.
"""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mesh import audit, audit_pod
from mesh.audit_client import send


@pytest.fixture
def trickler() -> Iterator[int]:
    """A server that answers a status line, then one header byte every 0.2 s (for 10 s)."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            for _ in range(50):
                if stop.wait(0.2):
                    return
                try:
                    conn.sendall(b"x")
                except OSError:
                    return
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    srv.close()
    t.join(5)


def test_the_client_bounds_the_whole_request_not_each_read(trickler: int) -> None:
    """http.client's timeout is per socket read: a byte every 0.2 s never trips a
    1 s one; the client's deadline ends the request after 1 s in all."""
    t0 = time.monotonic()
    got = send({"ip": "127.0.0.1", "port": trickler, "method": "GET", "target": "/",
                "timeout": 1, "headers": [["host", "x"]]})
    took = time.monotonic() - t0
    assert got["status"] == 0 and got["error"].startswith("Deadline: no complete answer within 1 s")
    assert 0.9 < took < 5, took


class _Local(audit_pod.PodClient):
    """The pod client's stand-in: `code` run by this Python, no netns."""

    def __init__(self, code: str) -> None:
        super().__init__({"name": "t-0", "netns": "-", "cgroup": "-"})
        self.code = code
        self.started = 0

    def _start(self) -> subprocess.Popen[bytes]:
        self.started += 1
        self.buf = b""
        self.proc = subprocess.Popen([sys.executable, "-c", self.code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        return self.proc


STUCK = "import sys, time\nsys.stdin.readline()\ntime.sleep(30)"
GARBLED = "import sys\nsys.stdin.readline()\nprint('Traceback (most recent call last):', flush=True)"


def test_a_stuck_client_is_stopped_and_the_next_request_gets_a_new_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_pod, "SLACK_S", 0.3)
    monkeypatch.setattr(audit_pod, "START_S", 0.2)
    client = _Local(STUCK)
    try:
        t0 = time.monotonic()
        got = client.ask({"ip": "x"}, 0.2)
        assert got["status"] == 0 and got["error"].startswith("no answer within 0.7 s"), got
        assert time.monotonic() - t0 < 5 and client.proc is None  # killed, not waited for
        client.code = "import sys, json\nsys.stdin.readline()\nprint(json.dumps(" \
                      "{'status': 204, 'error': ''}), flush=True)"
        assert client.ask({"ip": "x"}, 0.2)["status"] == 204 and client.started == 2
    finally:
        client.close()


def test_a_garbled_or_missing_answer_names_the_pod() -> None:
    client = _Local(GARBLED)
    try:
        with pytest.raises(audit_pod.AuditClientError,
                           match=r"client in pod t-0 answered b'Traceback.*not its JSON line"):
            client.ask({"ip": "x"}, 1)
        client.close()
        client.code = "pass"
        with pytest.raises(audit_pod.AuditClientError, match="client in pod t-0 ended"):
            client.ask({"ip": "x"}, 1)
    finally:
        client.close()


@pytest.fixture
def control_plane() -> Iterator[dict[str, Any]]:
    """A real HTTP server answering `answers[path]` (bytes) with 200."""
    answers: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = answers.get(self.path, b"{}")
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield {"admin": f"127.0.0.1:{srv.server_address[1]}", "answers": answers}
    srv.shutdown()
    srv.server_close()
    t.join(5)


def test_bad_control_plane_answers_are_audit_errors_naming_url_and_pod(
        control_plane: dict[str, Any]) -> None:
    admin, answers = control_plane["admin"], control_plane["answers"]
    answers["/debug/fastpath"] = b"<html>proxy error</html>"
    with pytest.raises(audit.AuditError, match=r"/debug/fastpath answered no JSON: b'<html>"):
        audit.run({"admin": admin, "name": "m", "pods": []})
    pod = {"name": "a-0", "node_id": "n1"}
    url = "/debug/fastpath/plans?proxyID=n1"
    for body, why in [(b'{"nodes": []}', "KeyError: 'plan'"),
                      (b'{"plan": {"node_id": "n1", "version": "1", "listeners": [{}]}}',
                       r"plan.listeners\[0\]"),
                      (b'{"plan": []}', "expected an object")]:
        answers[url] = body
        with pytest.raises(audit.AuditError, match=rf"the plan of pod a-0 from {admin}.*proxyID=n1 "
                                                   rf"is not a KernelPlan: .*{why}"):
            audit.load_plans({"admin": admin}, [pod])


STATE = {"name": "m", "admin": "cp", "pods": [
    {"name": "lg-0", "service": "lg"},  # no sidecar
    {"name": "a-0", "service": "a", "node_id": "n0"},
    {"name": "a-1", "service": "a", "node_id": "n1"}]}


def test_from_names_what_is_wrong_and_prefers_a_loaded_replica(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fastpath.plan import KernelPlan
    monkeypatch.setattr(audit, "_get", lambda _a, _p: {"enabled": True, "nodes": [
        {"node": "n1", "plan_version": "v1", "pools": []}]})
    plans = {"a-0": KernelPlan("n0", "v1", ()), "a-1": KernelPlan("n1", "v1", ())}
    with pytest.raises(audit.AuditError, match="no pod or service 'x' in mesh 'm'"):
        audit._sender(STATE, "x", plans)
    with pytest.raises(audit.AuditError, match="pod 'lg-0' of mesh 'm' has no sidecar"):
        audit._sender(STATE, "lg-0", plans)
    assert audit._sender(STATE, "a", plans)["name"] == "a-1"  # a-0's datapath is not loaded
    assert audit._sender(STATE, "a-0", plans)["name"] == "a-0"
    assert audit._sender(STATE, "a", {"a-0": plans["a-0"]})["name"] == "a-0"  # the one with a plan


def test_a_sender_without_a_plan_is_said(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "_get", lambda _a, p: None if "plans" in p else {
        "enabled": True, "nodes": []})
    said: list[str] = []
    assert audit.run(STATE, "a-0", wait_s=0, warn=said.append) == []
    assert said == ["no plan for pod a-0 from the control plane (cp): nothing it sends is audited"]
