"""How the mesh daemon runs the control plane (`l7fp serve`) for ADS delivery.

Called by `mesh.daemon` only. The server reads the pods' resources from the
config directory (docs/contracts.md) and hot-reloads it; with `istio_policies`
in the mesh file it generates the residual from Istio YAML instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mesh.spec import MeshSpec


def serve_argv(config_dir: Path, xds: tuple[str, int], admin: tuple[str, int], fastpath: str,
               spec: MeshSpec, state_file: Path) -> list[str]:
    """`l7fp serve` for one mesh; with `istio_policies`, istiod-like generation
    from that directory for the pods of `state_file` (the config dir stays empty)."""
    argv = [sys.executable, "-m", "xds_server", "serve",
            "--xds-address", xds[0], "--xds-port", str(xds[1]),
            "--admin-address", admin[0], "--admin-port", str(admin[1]), "--fastpath", fastpath,
            "--fastpath-mesh-state", str(state_file)]
    if spec.istio_policies is not None:
        return argv + ["--policies", str(spec.istio_policies), "--mesh-file", str(state_file)]
    return argv + ["--config", str(config_dir)]
