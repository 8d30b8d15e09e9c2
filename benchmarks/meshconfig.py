"""A configuration run on the project's local mesh (`mesh.runner.Mesh`): used for `l7fp`.

Called by `benchmarks.configs`. The mesh runner owns the pods, sidecars and
`l7fp serve` (with `--fastpath on`, which starts the fast-path agent); this
module writes a mesh file with the same four pods, apps and route table as the
harness's own nets (`benchmarks.topology`, `benchmarks.sidecar`), runs the load
generator in the client pod's cgroup (so the kernel fast path sees its
sockets) inside a `loadgen` child the harness creates and removes itself, and
reads the pods' CPU from the cgroups named in the mesh's state file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks import cgroups, sidecar
from benchmarks.configs import Configuration, Unavailable
from mesh import ready

APP_PORT = sidecar.APP_PORT
log = logging.getLogger(__name__)


DEMO = Path(__file__).resolve().parent.parent / "compose" / "demo" / "mesh.yaml"


def demo_mesh_file(name: str) -> dict[str, Any]:
    """The project's demo mesh (compose/demo) plus a `client` pod for the load generator."""
    doc = yaml.safe_load(DEMO.read_text())
    doc["name"] = name
    if doc.get("policies"):
        doc["policies"] = str((DEMO.parent / doc["policies"]).resolve())
    doc["services"]["client"] = {
        "command": ["${PYTHON}", "-m", "benchmarks.apps", "leaf", "--name", "client",
                    "--port", str(APP_PORT)],
        "ports": [APP_PORT], "calls": ["frontend"]}
    return doc


def mesh_file(name: str) -> dict[str, Any]:
    """The benchmark's pods as a mesh file (docs/mesh.md format)."""
    def app(*args: str) -> list[str]:
        return ["${PYTHON}", "-m", "benchmarks.apps", *args, "--port", str(APP_PORT)]

    mixes = {sidecar.mix_service(sh): {
        "command": app("leaf", "--name", sidecar.mix_service(sh)), "ports": [APP_PORT],
        "policy": {"outbound": {"routes": sidecar.policy_routes(sidecar.mix_service(sh), sh)}}}
        for sh in sidecar.MIX_SHARES}
    return {
        "name": name, "namespace": "bench",
        "services": {
            # the client pod runs the load generator; its app only keeps the pod alive
            "client": {"command": app("leaf", "--name", "client"), "ports": [APP_PORT],
                       "calls": ["leaf", "frontend", *mixes]},
            "leaf": {"command": app("leaf", "--name", "leaf"), "ports": [APP_PORT]},
            "frontend": {"command": app("frontend", "--name", "frontend",
                                        "--backend", f"backend:{APP_PORT}"),
                         "ports": [APP_PORT], "calls": ["backend"]},
            "backend": {"command": app("leaf", "--name", "backend"), "ports": [APP_PORT]},
            **mixes,
        },
    }


class MeshRunnerConfig(Configuration):
    """A configuration on the local mesh: `l7fp` (`--fastpath on`) always; with
    `l7fp bench --substrate mesh` also no-mesh (`--sidecars none`), sidecar and
    sidecar-l4 (`--fastpath off`, the bypass attached to the pod cgroups once
    the mesh is up)."""

    def __init__(self, workdir: Path, envoy: str, tag: str, *, name: str = "l7fp",
                 sidecars: str = "envoy", fastpath: str = "on", bypass: Any = None,
                 demo: bool = False) -> None:
        self.workdir, self.envoy, self.fastpath = workdir, envoy, fastpath
        self.name, self.sidecars, self.bypass = name, sidecars, bypass
        self.has_policy = sidecars != "none"
        code = {"no-mesh": "nm", "sidecar": "sc", "sidecar-l4": "l4"}.get(name, "fp")
        self.demo = demo
        self.mesh_name = f"bench-{tag}-{'d' if demo else ''}{code}"[:23]
        # the fast-path probe: the bench mesh's leaf, the demo's /home
        self.probe = ("frontend", "/home") if demo else ("leaf", "/")
        self.mesh: Any = None
        self.state: dict[str, Any] = {}
        self.loadgen: Path | None = None

    def up(self) -> None:
        try:
            from mesh.runner import Mesh, MeshError
        except ImportError as exc:
            raise Unavailable(f"mesh.runner not importable: {exc}") from exc
        path = self.workdir / f"{self.mesh_name}.yaml"
        doc = demo_mesh_file(self.mesh_name) if self.demo else mesh_file(self.mesh_name)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.mesh = Mesh(path, sidecars=self.sidecars, xds="ads", fastpath=self.fastpath,
                         envoy=self.envoy)
        try:
            self.state = self.mesh.up()
        except MeshError as exc:
            self.mesh = None
            raise Unavailable(f"`l7fp mesh up --fastpath {self.fastpath}` failed: {exc}") from exc
        except BaseException:  # Ctrl-C while the daemon starts: remove it by name
            self.down()
            raise
        try:
            self.loadgen = cgroups.make(Path(self._pod("client")["cgroup"]) / "loadgen")
            if self.bypass is not None:
                self.bypass.attach([Path(p["cgroup"]) for p in self.state["pods"]])
            if self.name == "l7fp":
                self._check_fast_path()
        except BaseException:
            self.down()
            raise

    def _check_fast_path(self, tries: int = 3, timeout: float = 180.0) -> None:
        """Refuse to report `l7fp` figures unless the kernel really served requests.

        Up to `tries` 1 s probes, each on a fresh connection after the agent
        is ready (again): a probe connection whose first request finds its pool
        empty (a refill still catching up) goes to Envoy for its life. One
        deadline, `timeout` s, for all the waits: the first waits for every
        node, a retry only for the client's node and pools, in what is left
        (a mesh that never gets ready is reported after `timeout` s and the
        probes, not `tries` times that)."""
        from benchmarks import load

        served, after = 0, {}
        deadline = time.monotonic() + timeout
        for attempt in range(tries):
            self._wait_agent(max(0.0, deadline - time.monotonic()), every_node=attempt == 0)
            before = self.counters()
            load.run_wrk(self.url(*self.probe), 1, 1, netns=self.client_netns,
                         cgroup=self.loadgen)
            after = self.counters()
            served = after.get("kernel_requests", 0) - before.get("kernel_requests", 0)
            if served > 0:
                return
            log.warning("%s: the fast path served none of a 1 s probe to %s %s (try %d of %d)%s",
                        self.mesh_name, self.probe[0], self.probe[1], attempt + 1, tries,
                        "; probing again" if attempt + 1 < tries else "")
        why = self._agent_reasons()
        self.down()
        raise Unavailable("the mesh came up with --fastpath on, but the fast path served no "
                          f"request of {tries} 1 s probes to {self.probe[0]} {self.probe[1]} "
                          f"(counters {after or 'none'} "
                          "from l7fp_fastpath_requests_total on the admin /metrics)"
                          + (f"; the agent says: {why}" if why else ""))

    def _agent_reasons(self) -> str:
        """The agent's own words on what it did not offload (from /debug/fastpath), deduplicated."""
        import json
        import urllib.request

        try:
            url = f"http://{self.state['admin']}/debug/fastpath"
            with urllib.request.urlopen(url, timeout=3) as r:
                doc = json.loads(r.read())
        except (OSError, ValueError) as exc:
            return f"/debug/fastpath unreadable ({exc})"
        reasons: dict[str, int] = {}
        for node in doc.get("nodes", []):
            for reason in (node.get("not_offloaded") or {}).values():
                reasons[str(reason)] = reasons.get(str(reason), 0) + 1
        for node, reason in (doc.get("nodes_failed") or {}).items():
            reasons[f"{node} failed: {reason}"] = 1
        if not doc.get("nodes"):
            reasons["no node datapath loaded"] = 1
        client = self._pod("client")["name"]
        node = ready.client_node(doc, client)
        if node is None:
            reasons[f"{client}: no datapath loaded"] = 1
        else:
            reasons[f"{client}: free pooled upstreams " + ready.pools_text(node)] = 1
        return "; ".join(f"{r} (x{n})" for r, n in reasons.items())

    def _wait_agent(self, timeout: float, every_node: bool) -> None:
        """Wait until the fast path is ready for the client pod's requests
        (mesh.ready: the client's node has its plan applied and its pools warm;
        with `every_node`, every pod's plan applied with none still due). The
        agent starts one node at a time: the module is compiled once (~4 s
        CPU), each node pays the verifier (~2 s), more under load
        (docs/fastpath.md "Bring-up time"). At `timeout`, or when a node
        failed, it returns all the same (with a warning): the probe then
        says what is missing."""
        try:
            ready.wait_ready(self.state["admin"], client=self._pod("client")["name"],
                             every_node=every_node, timeout=timeout)
        except ready.NotReady as exc:
            log.warning("%s: %s", self.mesh_name, exc.why)

    def down(self) -> None:
        if self.bypass is not None:
            self.bypass.detach()
        if self.loadgen is not None:
            try:
                cgroups.remove_tree(self.loadgen)
            except RuntimeError:
                pass
            self.loadgen = None
        if self.mesh is not None:
            self.mesh.down()
            self.mesh = None

    def _pod(self, service: str) -> dict[str, Any]:
        for p in self.state["pods"]:
            if p["service"] == service:
                return dict(p)
        raise RuntimeError(f"mesh {self.mesh_name}: no pod of service {service!r}")

    @property
    def client_netns(self) -> str:
        return str(self._pod("client")["netns"])

    @property
    def loadgen_cgroup(self) -> Path:
        assert self.loadgen is not None
        return self.loadgen

    def url(self, pod: str, path: str = "/") -> str:
        vip = next(s["vip"] for s in self.state["services"] if s["name"] == pod)
        return f"http://{vip}:{APP_PORT}{path}"

    def cpu_usec(self) -> int:
        """All pods (apps, sidecars, kernel work charged to them) and the control plane
        (`l7fp serve`, which hosts the fast-path agent), minus the load generator."""
        dirs = [Path(p["cgroup"]) for p in self.state["pods"]]
        control = dirs[0].parent / "_control-plane"
        if control.exists():
            dirs.append(control)
        total = sum(cgroups.usage_usec(d) for d in dirs)
        return total - (cgroups.usage_usec(self.loadgen) if self.loadgen else 0)

    def _sidecar_pids(self) -> list[int]:
        return [int(p["pids"]["envoy"]) for p in self.state["pods"]
                if p.get("pids", {}).get("envoy")]

    def sidecar_rss(self) -> int:
        return cgroups.rss_bytes(self._sidecar_pids())

    def sidecar_count(self) -> int:
        return len(self._sidecar_pids())

    def counters(self) -> dict[str, int]:
        if self.bypass is not None:
            return dict(self.bypass.stats())
        return fastpath_counters(self.state) if self.name == "l7fp" else {}

    def kernel_share(self, delta: dict[str, int]) -> float | None:
        if self.name != "l7fp":
            return super().kernel_share(delta)
        kernel, total = delta.get("kernel_requests", 0), delta.get("requests", 0)
        return round(kernel / total, 4) if total else 0.0


KERNEL_OUTCOMES = ("fast", "kernel_reply")


def fastpath_counters(state: dict[str, Any]) -> dict[str, int]:
    """Requests the fast path saw, and those it served in the kernel, from /metrics.

    Sums `l7fp_fastpath_requests_total{node,route,outcome,reason}` of the
    control plane's admin server over nodes and routes: outcomes `fast` and
    `kernel_reply` are the kernel's, `envoy` the slow path's. Empty when the
    page does not answer: the share is then reported as 0, never guessed.
    """
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{state['admin']}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return parse_fastpath_metrics(text)


def parse_fastpath_metrics(text: str) -> dict[str, int]:
    """Totals of l7fp_fastpath_requests_total in a Prometheus exposition text."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"requests": 0, "kernel_requests": 0}
    for fam in text_string_to_metric_families(text):
        if fam.name not in ("l7fp_fastpath_requests", "l7fp_fastpath_requests_total"):
            continue
        for sample in fam.samples:
            if not sample.name.endswith("_total"):
                continue
            n = int(sample.value)
            out["requests"] += n
            if sample.labels.get("outcome") in KERNEL_OUTCOMES:
                out["kernel_requests"] += n
    return out
