"""The agent side of the differential data-path tests (K2): the plan the split
makes of the config a real Envoy runs, loaded into the agent, and a client
script run inside the scoped cgroup (the same script then goes through Envoy
only, once the test detaches the cgroup).

Owner: K2. Callers: test_delay.py, test_timeouts.py (with k2_envoy.py for
their Envoy); load_plan also test_dfa_datapath.py, test_query_datapath.py and
test_framing_l7fp.py; with_routes test_dfa_datapath.py, test_query_datapath.py.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from test_agent import wait_applied, wait_for

from fastpath import envoy_model as em
from fastpath.agent import Agent
from fastpath.classify_route import KernelCaps
from fastpath.plan import KernelPlan, Route
from fastpath.split import split_snapshot


def split_plan(listener: dict[str, Any], cluster: dict[str, Any],
               caps: KernelCaps | None = None) -> KernelPlan:
    """Node "client"'s plan from the split of the same resources Envoy runs."""
    res = {em.LISTENER: [em.parse(em.LISTENER, listener)],
           em.CLUSTER: [em.parse(em.CLUSTER, cluster)]}
    if caps is None:
        return split_snapshot("client", res).plan
    return split_snapshot("client", res, caps).plan


def with_routes(plan: KernelPlan, routes: tuple[Route, ...]) -> KernelPlan:
    """`plan` (one listener, one virtual host, as test_agent.client_plan makes)
    with that virtual host's routes replaced by `routes`."""
    lst = plan.listeners[0]
    vh = lst.virtual_hosts[0]
    return replace(plan, listeners=(replace(lst, virtual_hosts=(replace(vh, routes=routes),)),))


def load_plan(agent: Agent, plan: KernelPlan, up: KernelPlan | None = None) -> Any:
    """Give the agent `plan` for node "client" (and `up`, default an empty one,
    for "up", the pod at 127.0.0.1 whose inbound side the client merges); the
    client's node once its plan is applied and its socket pools are filled."""
    agent.on_plan("up", up or KernelPlan("up", "u1"))
    agent.on_plan("client", plan)
    wait_applied(agent)
    node = agent.nodes["client"]
    wait_for(lambda: all(p["free"] >= 3 for p in node.pools.snapshot()))
    return node


def run_client(cgroup: Any, client: Path, port: int, script: Any) -> Any:
    """Run the client script `client` inside `cgroup` against 127.0.0.1:`port`
    with the JSON `script`; its JSON output (a failure shows its stderr)."""
    r = cgroup.run([sys.executable, str(client), "127.0.0.1", str(port), json.dumps(script)])
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)
