"""`l7fp split DIR` on a `l7fp serve --config DIR`: the files are one config, as serve reads them.

Found on a first day with L7FP (docs/first-day.md): `l7fp split examples/basic`
read each file alone and said "cluster 'api' not defined" (the clusters are in
clusters.yaml next to it) and showed the listener without its routes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fastpath import inputs
from fastpath.coverage import analyse

REPO = Path(__file__).resolve().parents[2]
BASIC = REPO / "examples" / "basic"


def test_basic_example_is_one_config() -> None:
    report = analyse([str(BASIC)])
    assert list(report.files) == [str(BASIC)]
    assert any("4 files read as one config" in n for n in report.files[str(BASIC)]["notes"])
    routes = {r.name: r for r in report.routes}
    assert set(routes) == {"health", "admin-denied", "api", "web"}
    assert {r.listener for r in report.routes} == {"http_18000"}
    assert not any("not defined" in r.reason for r in report.routes), report.routes


def test_other_directories_stay_file_by_file(tmp_path: Path) -> None:
    """A node_selector (a mesh's per-service files) or a file of another format: each file alone."""
    d = tmp_path / "cfg"
    shutil.copytree(BASIC, d)
    text = (d / "clusters.yaml").read_text()
    (d / "clusters.yaml").write_text("node_selector: {cluster: 'web*'}\n" + text)
    assert len(analyse([str(d)]).files) == 4
    (d / "clusters.yaml").write_text(text)
    inputs.load_yaml.cache_clear()  # cached by path: the file changed under the same name
    assert list(analyse([str(d)]).files) == [str(d)]
    assert len(analyse([str(d / "routes.yaml"), str(d / "clusters.yaml")]).files) == 2
