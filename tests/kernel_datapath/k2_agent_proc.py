"""The agent as its own process, for the kill -9 test: serves the test plan of
test_agent.client_plan until killed. Usage: k2_agent_proc.py STATE ENVOY_PORT UP_PORT"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_agent import client_plan  # noqa: E402

from fastpath.agent import Agent  # noqa: E402
from fastpath.plan import KernelPlan  # noqa: E402

a = Agent(Path(sys.argv[1]))
a.start()
a.on_plan("up", KernelPlan("up", "u1"))
a.on_plan("client", client_plan(int(sys.argv[2]), int(sys.argv[3])))
while not (a.nodes.get("client") and a.nodes["client"].plan):
    time.sleep(0.05)
while not any(p["free"] >= 4 for p in a.nodes["client"].pools.snapshot()):
    time.sleep(0.05)
print("READY", flush=True)
while True:
    time.sleep(1)
