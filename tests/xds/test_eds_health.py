"""The kernel's outlier ejections reach the node's Envoy as EDS UNHEALTHY (NAME=odown).

xds_server.eds_health marks the hosts the endpoint-health provider (the
fast-path agent: the kernel's LB view) names, in the residual of a node the
kernel owns. Unit tests with a fake provider; the Envoy test shows the real
binary skipping a host marked so (and its panic threshold counting it, as an
outlier ejection) and measures the delay from the provider's change (a
`resplit`) to Envoy skipping the host.
"""

from __future__ import annotations

import time

import pytest

from fastpath.split import split_snapshot
from xds_server import eds_health
from xds_server import resources as res
from xds_server.node import NodeInfo
from xds_server.serve import options, running
from xds_server.server import XdsServer

from .conftest import http_get, start_envoy, wait_for
from .helpers import eds_cluster, free_port, listener, messages, route, route_config
from .test_server_unit import Static

NODE = "sidecar~127.0.0.1~eh-0.t~t.svc.cluster.local"


def two_hosts(name: str, ports: list[int]) -> dict:
    return {"@type": res.ENDPOINT, "cluster_name": name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
        for p in ports]}]}


def config(ports: list[int], lport: int) -> list[dict]:
    c = eds_cluster("c")
    c["lb_policy"] = "ROUND_ROBIN"
    return [c, two_hosts("c", ports), listener("l", lport, "r"), route_config("r", [route("/", "c")])]


def health(snap) -> dict[str, int]:
    (cla,) = [e.message for e in snap.of_type(res.ENDPOINT).values()]
    return {eds_health._host(lbe): int(lbe.health_status)
            for lo in cla.endpoints for lbe in lo.lb_endpoints}


LOGGERS = 2  # per listener that routes to an owned cluster: the router's and the HCM's (UT)


def _listeners_logging(srv: XdsServer, node: str) -> int:
    """How many of the node's listeners have our loggers (both, or none: AssertionError)."""
    counts = [bytes(e.message).count(b"l7fp_outlier")
              for e in srv.cache.get(node).of_type(res.LISTENER).values()]
    assert set(counts) <= {0, LOGGERS}, counts
    return sum(counts) // LOGGERS


def test_overlay_marks_named_hosts_on_a_copy():
    msgs = messages(*config([1, 2], 3))
    out = eds_health.overlay(msgs, {"c": frozenset({"127.0.0.1:2", "127.0.0.1:9"}), "x": frozenset()})
    (orig,), (got,) = msgs[res.ENDPOINT], out[res.ENDPOINT]
    assert got is not orig and [int(lbe.health_status) for lbe in orig.endpoints[0].lb_endpoints] == [0, 0]
    assert [int(lbe.health_status) for lbe in got.endpoints[0].lb_endpoints] == [0, 2]
    assert out[res.CLUSTER][0] is msgs[res.CLUSTER][0]
    assert eds_health.overlay(msgs, {"c": frozenset()})[res.ENDPOINT][0] is orig
    assert eds_health.key({"b": frozenset({"y", "x"}), "a": frozenset()}) == (("b", ("x", "y")),)


def test_server_marks_only_while_the_kernel_owns_the_node():
    out = {"c": frozenset({"127.0.0.1:2"})}
    owner = {"n1": False}
    srv = XdsServer([Static(messages(*config([1, 2], 3)))], splitter=split_snapshot)
    srv.set_limit_owner(lambda n, plan: owner[n])
    srv.set_endpoint_health(lambda n: out)
    srv.ensure_node(NodeInfo("n1"))
    assert health(srv.cache.get("n1")) == {"127.0.0.1:1": 0, "127.0.0.1:2": 0}
    owner["n1"] = True
    assert srv.resplit(["n1"]).result(1) == 1
    assert health(srv.cache.get("n1")) == {"127.0.0.1:1": 0, "127.0.0.1:2": 2}
    out = {"c": frozenset()}  # the host is back in the kernel's LB view
    assert srv.resplit(["n1"]).result(1) == 1
    assert health(srv.cache.get("n1")) == {"127.0.0.1:1": 0, "127.0.0.1:2": 0}
    assert srv.resplit(["n1"]).result(1) == 0  # no change, no push
    out = {"c": frozenset({"127.0.0.1:2"})}
    assert srv.resplit(["n1"]).result(1) == 1
    srv.set_endpoint_health(lambda n: 1 / 0)  # a broken provider: the last good answer stays
    assert srv.resplit(["n1"]).result(1) == 0
    assert health(srv.cache.get("n1")) == {"127.0.0.1:1": 0, "127.0.0.1:2": 2}
    srv.stream_closed("n1")  # gone, back later with the provider still broken: no stale marks
    srv.ensure_node(NodeInfo("n1"))
    assert health(srv.cache.get("n1")) == {"127.0.0.1:1": 0, "127.0.0.1:2": 0}


def test_envoys_detector_stays_until_the_kernel_hears_its_path():
    """Kernel-owned node, provider None (no access-log stream of the node's
    Envoy yet): the residual keeps Envoy's outlier_detection (and the logger,
    so Envoy opens the stream); {}: the kernel's detector alone; None again
    (the stream went): Envoy's back."""
    from tests.fastpath_unit.test_residual_outlier import resources

    node = "sidecar~198.18.0.9~c-0.t~t.svc.cluster.local"
    answer: dict[str, frozenset[str]] | None = None
    srv = XdsServer([Static(resources())], splitter=split_snapshot)
    srv.set_limit_owner(lambda n, plan: True)
    srv.set_endpoint_health(lambda n: answer)
    srv.ensure_node(NodeInfo(node))

    def detector() -> object:
        (od,) = [e.message for e in srv.cache.get(node).of_type(res.CLUSTER).values()
                 if e.message.name == "od"]
        return od.outlier_detection

    def logs() -> int:
        return _listeners_logging(srv, node)  # one listener routes to od

    assert detector() is not None and logs() == 1
    answer = {}
    assert srv.resplit([node]).result(1) == 1
    assert detector() is None and logs() == 1
    answer = None
    assert srv.resplit([node]).result(1) == 1
    assert detector() is not None



def test_a_given_up_node_gets_no_logger_and_keeps_envoys_detector():
    """The agent gave up waiting for the node's stream (Istio: pilot-agent's
    proxy serves ADS only): the residual loses the logger, Envoy's detector
    stays; the limiters stay stripped as before (kernel-owned)."""
    from fastpath.residual_outlier import without_als
    from tests.fastpath_unit.test_residual_outlier import resources

    node = "sidecar~198.18.0.9~c-0.t~t.svc.cluster.local"
    off = False
    srv = XdsServer([Static(resources())], splitter=split_snapshot)
    srv.set_limit_owner(lambda n, plan: True)
    srv.set_access_log_off(lambda n: off, without_als)
    srv.ensure_node(NodeInfo(node))

    def listeners() -> bytes:
        return b"".join(bytes(e.message) for e in srv.cache.get(node).of_type(res.LISTENER).values())

    assert listeners().count(b"l7fp_outlier") == LOGGERS
    off = True
    assert srv.resplit([node]).result(1) == 1
    assert b"l7fp_outlier" not in listeners() and b"router.v3.Router" in listeners()
    (od,) = [e.message for e in srv.cache.get(node).of_type(res.CLUSTER).values()
             if e.message.name == "od"]
    assert od.outlier_detection is not None


def test_envoys_detectors_are_copied_back_once_per_split(monkeypatch, caplog):
    """Kernel-owned node without a log stream, the logger given up, then
    back: each residual keeps Envoy's detectors, copied from the split's
    envoy residual once (the logger flip reuses them), again after a new
    split. A raising logger check keeps the logger (logged)."""
    from fastpath.residual_outlier import without_als
    from tests.fastpath_unit.test_residual_outlier import resources

    calls = []
    real = eds_health.with_detectors
    monkeypatch.setattr(eds_health, "with_detectors", lambda *a: calls.append(1) or real(*a))
    node, state = "sidecar~198.18.0.9~c-0.t~t.svc.cluster.local", {"off": False}
    src = Static(resources())
    srv = XdsServer([src], splitter=split_snapshot)
    srv.set_limit_owner(lambda n, plan: True)
    srv.set_access_log_off(lambda n: state["off"], without_als)
    srv.ensure_node(NodeInfo(node))

    def logs() -> int:
        return _listeners_logging(srv, node)

    for off in (True, False, True):
        state["off"] = off
        assert srv.resplit([node]).result(1) == 1
        (od,) = [e.message for e in srv.cache.get(node).of_type(res.CLUSTER).values()
                 if e.message.name == "od"]
        assert od.outlier_detection is not None and logs() == (0 if off else 1)
    assert len(calls) == 1
    src.gen += 1  # a new resources key: a new split
    srv.rebuild()
    assert len(calls) == 2
    srv.set_access_log_off(lambda n: 1 / 0, without_als)
    srv.resplit([node]).result(1)
    assert logs() == 1 and "access log check failed for node " + node in caplog.text


@pytest.mark.envoy
async def test_envoy_skips_a_host_marked_unhealthy(config_dir, envoys, envoy_bin, upstreams):
    """Round robin over `one` and `two`; `two` marked: only `one` answers
    (delay printed); both marked: 0 of 2 healthy < 50 %: panic, both answer
    again (as with two outlier ejections); none marked: both again."""
    lport = free_port()
    config_dir.write("all.yaml", config([upstreams["one"], upstreams["two"]], lport))
    async with running(options(config=str(config_dir.path), xds_address="127.0.0.1", xds_port=0,
                               admin_port=0, fastpath="off")) as srv:
        server = srv.server
        server.splitter = split_snapshot
        out: dict[str, frozenset[str]] = {}
        server.set_limit_owner(lambda n, plan: True)
        server.set_endpoint_health(lambda n: out)
        start_envoy(envoys, envoy_bin, srv.xds_port, NODE, False)

        async def answers(n: int = 6) -> set[str]:
            return {(await http_get(lport, f"/{i}"))[1] for i in range(n)}

        async def both() -> bool:
            return await answers() == {"one", "two"}

        await wait_for(both, 20)
        hosts = {k: f"127.0.0.1:{p}" for k, p in upstreams.items()}
        delays, panics = [], []
        for _ in range(3):
            out = {"c": frozenset({hosts["two"]})}
            t0 = time.monotonic()
            server.resplit([NODE])

            async def only_one() -> bool:
                return (await http_get(lport, "/x"))[1] == "one" and await answers() == {"one"}

            await wait_for(only_one, 10, step=0.001)
            delays.append(time.monotonic() - t0)
            out = {"c": frozenset(hosts.values())}
            server.resplit([NODE])
            panics.append(await wait_for(both, 10, step=0.001))  # panic: every host again
            out = {}
            server.resplit([NODE])
            await wait_for(both, 10)
        print("EDS UNHEALTHY -> Envoy skips the host, s (includes one request + 6):",
              [round(d, 4) for d in delays], "both marked -> panic:", [round(d, 4) for d in panics])
