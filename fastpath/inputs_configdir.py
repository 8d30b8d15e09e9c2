"""`l7fp split DIR` on the directory of `l7fp serve --config DIR`: one config, as serve reads it.

Called by `fastpath.coverage.analyse` for each directory named on the command
line; owned by the split. `l7fp serve` merges every file of its directory into
one snapshot (xds_server.sources.files), so a config is usually spread over
files: routes in one, clusters in another (examples/basic). The split reads a
corpus file by file (each file an independent example), and read that way each
file of such a directory is half a config: "cluster 'api' not defined", the
listener's routes missing. So a directory whose files are all plain xDS resource
files (top-level `resources:` of `@type` items, no `node_selector`, not a
CiliumEnvoyConfig) is read as one Document, the way serve reads it. Any other
directory (a corpus, a mesh's config dir with per-node selectors) stays file by
file.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from fastpath import inputs


def _plain_xds_file(path: Path) -> bool:
    """One YAML document `{resources: [{"@type": ...}, ...]}` and nothing else."""
    try:
        docs = inputs.load_yaml(path)
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return False
    if len(docs) != 1 or not isinstance(docs[0], dict) or set(docs[0]) != {"resources"}:
        return False
    items = docs[0]["resources"]
    return isinstance(items, list) and bool(items) and \
        all(isinstance(i, dict) and "@type" in i for i in items)


def read_config_dir(directory: Path, files: list[Path]) -> inputs.Document | None:
    """The files of `directory` (`files`: its listing, inputs.files) as one
    envoy-xds Document, or None when it is not a `serve --config` directory of
    two files or more (then each file is read alone)."""
    if len(files) < 2 or not all(_plain_xds_file(f) for f in files):
        return None
    docs = [d for f in files for d in inputs.read(f)]
    if any(d.format != "envoy-xds" or d.error for d in docs):
        return None
    out = inputs.Document(str(directory), "envoy-xds")
    for d in docs:
        for type_url, msgs in d.resources.items():
            out.resources.setdefault(type_url, []).extend(msgs)
        out.skipped += d.skipped
        out.unread += d.unread
        out.opaque += d.opaque
        out.notes += d.notes
        out.rejected += d.rejected
    out.notes.append(f"{len(files)} files read as one config, as `l7fp serve --config "
                     f"{directory}` serves them")
    return out
