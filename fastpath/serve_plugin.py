"""`l7fp serve` plugin of the fast path: its flags, /debug/fastpath and /debug/fastpath/plans.

Owner: K2. Loaded by `xds_server.serve` (SERVE_PLUGINS). The agent itself is
started by `xds_server.fastpath_hook` (`fastpath.agent.start`) after the
servers are up; the page finds it through `fastpath.agent.AGENTS`.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from aiohttp import web


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kernel fast path (with --fastpath on|auto)")
    g.add_argument("--fastpath-mesh-state", metavar="FILE",
                   help="state.json of the local mesh whose pods get the fast path "
                        "(default: state.json next to --config DIR, as the mesh runner starts us)")
    g.add_argument("--fastpath-decide", choices=["inline", "l7fp"],
                   default=os.environ.get("L7FP_FASTPATH_DECIDE", "l7fp"),
                   help="decision compiled into the data path: l7fp_decide synthesized per "
                        "plan (fastpath.synth; default) or the data path's small built-in one "
                        "(inline); a node whose l7fp program does not load falls back to "
                        "inline. Default from $L7FP_FASTPATH_DECIDE when set.")
    g.add_argument("--fastpath-access-log", type=_sample, default=16, metavar="N",
                   help="kernel access log: one event for one request in N, at random "
                        "(default 16; 1: every request; 0: none; each event costs the agent CPU)")
    g.add_argument("--fastpath-no-access-log", action="store_true",
                   help="no kernel access-log events at all (counters stay)")


SAMPLE_MAX = 2**32 - 1  # dp_cfg.access_log is a __u32: ctypes would wrap a larger count


def _sample(text: str) -> int:
    """--fastpath-access-log: a count 0..SAMPLE_MAX (the data path's unsigned 32-bit
    dp_cfg.access_log; 2**32 would wrap to 0: none, 2**32+1 to 1: every request)."""
    if not (text.isascii() and text.isdigit()) or int(text) > SAMPLE_MAX:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number 0-{SAMPLE_MAX}")
    return int(text)


def setup(server: Any, app: web.Application, args: argparse.Namespace) -> None:
    async def debug_fastpath(request: web.Request) -> web.Response:
        from fastpath.agent import AGENTS

        agent = AGENTS.get(id(server))
        if agent is None:
            return web.json_response({"enabled": False, "mode": getattr(args, "fastpath", None)})
        return web.json_response({"enabled": True, **agent.debug()}, dumps=_dumps)

    async def debug_plans(request: web.Request) -> web.Response:
        """`/debug/fastpath/plans?proxyID=NODE`: that node's KernelPlan as JSON
        (`KernelPlan.to_json`; `fastpath.plan_json` reads it back), the node's
        own plan before the agent merges its destinations' inbound listeners;
        with an agent, its verdicts say where the destinations' inbound side
        hands every request of a route to Envoy (`Agent.plan_view`).
        Without proxyID: the node ids that have a plan. For `l7fp mesh audit`."""
        from fastpath.agent import AGENTS

        plans = getattr(server, "plans", {})
        node = request.query.get("proxyID")
        if not node:
            return web.json_response({"nodes": sorted(plans)})
        agent = AGENTS.get(id(server))
        plan = (agent.plan_view(node) if agent is not None else None) or plans.get(node)
        if plan is None:
            return web.json_response({"error": f"no plan for proxy {node!r}",
                                      "nodes": sorted(plans)}, status=404)
        return web.json_response({"node": node, "plan": plan.to_json()})

    app.router.add_get("/debug/fastpath", debug_fastpath)
    app.router.add_get("/debug/fastpath/plans", debug_plans)


def grpc_services(server: Any, args: argparse.Namespace) -> list[Any]:
    """The access log service on the ADS port: the responses the sidecars'
    Envoys get from clusters whose outlier detection the kernel owns go to
    the agent's detectors (fastpath.als, fastpath.residual_outlier)."""
    if getattr(args, "fastpath", "auto") == "off":
        return []
    from fastpath.als import AccessLogService, Observation

    def sink(node_id: str, obs: list[Observation]) -> None:
        from fastpath.agent import AGENTS

        agent = AGENTS.get(id(server))
        if agent is not None:
            agent.envoy_observed(node_id, obs)

    def on_stream(node_id: str, live: bool) -> None:
        from fastpath.agent import AGENTS

        agent = AGENTS.get(id(server))
        if agent is not None:
            agent.als_stream(node_id, live)

    return [AccessLogService(sink, on_stream)]


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=1, default=str)
