"""Run a differential test's two meshes (fast path off and on) side by side.

Callers: the on/off comparisons of tests/kernel_differential, kernel_retry,
kernel_mirror and istio. Each passes `run(mode)`, which brings up its own
mesh (a name and folder of that mode), sends its requests and tears the mesh
down in a `finally`. The two runs share nothing but the host, so they need not
wait for each other: with the fast path on, most of a run is the agent
compiling each pod's program (one core, 10-20 s on a loaded machine), time in
which the Envoy-only run does all its work on the other core. Both runs end
(and clean up) before an error of either is raised.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
MODES = ("off", "on")


def both_modes(run: Callable[[str], T]) -> dict[str, T]:
    """{"off": run("off"), "on": run("on")}, the two calls in parallel threads;
    the first failure (off before on) is raised once both have returned."""
    with ThreadPoolExecutor(len(MODES), thread_name_prefix="mesh-run") as ex:
        futures = {mode: ex.submit(run, mode) for mode in MODES}
    return {mode: f.result() for mode, f in futures.items()}
