"""Write pods' Envoy resources where their consumer reads them.

Called by `mesh.runner` at `up` and on every policy change. Two consumers:

* `l7fp serve --config DIR` (ADS), format of docs/contracts.md: `mesh.json`
  with the outbound side every sidecar shares (node_selector id `sidecar~*`),
  and `svc-<service>.json` with that service's inbound side (node_selector
  cluster `<service>.<namespace>`, the sidecars' node cluster). Sharing keeps
  the directory small, so the server reloads it fast on a policy change
  (JSON, the quickest for it to parse);
* Envoy's own filesystem xDS (`--xds file`): per pod a directory with
  `cds.yaml`, `lds.yaml` and one `rds-*.yaml` per route configuration.

Every file is written to a dot-file and renamed into place, so readers never
see half a file; on a change, clusters are written before routes before
listeners (make before break).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from mesh import envoyconf as ec


def atomic_write(path: Path, text: str) -> bool:
    """Write `text` to `path` by rename; False (nothing written) when unchanged."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


def _dump(doc: dict[str, Any]) -> str:
    # JSON is YAML; it keeps keys such as "@type" and "|" free of quoting issues.
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def write_ads_file(config_dir: Path, stem: str, selector: dict[str, str],
                   resources: dict[str, list[dict[str, Any]]]) -> bool:
    """Resources for the nodes `selector` picks, for `l7fp serve --config DIR`."""
    config_dir.mkdir(parents=True, exist_ok=True)
    order = [ec.CLUSTER, ec.CLA, ec.ROUTE, ec.LISTENER]
    doc = {"node_selector": selector,
           "resources": [r for t in order for r in resources.get(t, [])]}
    return atomic_write(config_dir / f"{stem}.json", _dump(doc))


def write_file_xds(pod_dir: Path, resources: dict[str, list[dict[str, Any]]]) -> bool:
    """One pod's resources for Envoy's filesystem subscriptions (`--xds file`)."""
    pod_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(pod_dir, 0o755)
    changed = atomic_write(pod_dir / "cds.yaml", _dump({"resources": resources[ec.CLUSTER]}))
    for rc in resources[ec.ROUTE]:
        changed |= atomic_write(pod_dir / ec.rds_filename(rc["name"]), _dump({"resources": [rc]}))
    changed |= atomic_write(pod_dir / "lds.yaml", _dump({"resources": resources[ec.LISTENER]}))
    return changed


def write_bootstrap(path: Path, boot: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, yaml.safe_dump(boot, sort_keys=False))
