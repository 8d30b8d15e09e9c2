"""`l7fp split` as a new user meets it: a file that holds no policy L7FP reads (a mesh
file, an empty file) printed `coverage: routes 0/0` and exit 0, as if the file were
fine; the docs' example named a file that did not exist."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from xds_server.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text", ["", "- 1\n- 2\n", "name: t\nservices:\n  a: {ports: [80]}\n"])
def test_named_file_with_nothing_read_is_said(text: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "mesh.yaml"
    f.write_text(text)
    assert main(["split", str(f)]) == 1
    assert capsys.readouterr().err == (
        f"l7fp split: {f}: no policy in it that L7FP reads (Envoy bootstrap or xDS "
        "resources, Istio, Gateway API, CiliumEnvoyConfig)\n")


def test_under_a_directory_it_is_no_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A directory is a survey: files it has that are no policy are passed over quietly."""
    (tmp_path / "empty.yaml").write_text("")
    shutil.copy(REPO / "examples" / "front-proxy.yaml", tmp_path)
    assert main(["split", str(tmp_path)]) == 0
    assert capsys.readouterr().err == ""


def test_a_directory_with_no_policy_at_all_is_said(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong directory (no policy file under it) printed `coverage: routes 0/0` and exit 0."""
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "notes.txt").write_text("listeners: []\n")
    assert main(["split", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"l7fp split: {tmp_path}: no *.yaml, *.yml or *.json file "
                                       "under it holds a policy L7FP reads\n")


@pytest.mark.parametrize("arg", [".", "./"])
def test_the_current_directory_with_a_policy_is_no_error(arg: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`l7fp split .` said '.: no *.yaml ... file under it holds a policy' and exit 1 after
    printing its coverage: the files under `.` are named `front-proxy.yaml`, not `./...`."""
    shutil.copy(REPO / "examples" / "front-proxy.yaml", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["split", arg]) == 0
    assert capsys.readouterr().err == ""


def test_explain_says_when_nothing_needs_envoy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The heading of the ENVOY needs stood alone, with nothing under it."""
    shutil.copytree(REPO / "examples" / "basic", tmp_path / "basic")
    routes = tmp_path / "basic" / "routes.yaml"  # without its response headers: all KERNEL
    routes.write_text("".join(ln for ln in routes.read_text().splitlines(keepends=True)
                              if "response_headers_to_add" not in ln))
    assert main(["split", "--explain", str(tmp_path / "basic")]) == 0
    out = capsys.readouterr().out
    assert "coverage: routes 4/4 (100.0%)" in out
    assert out.endswith("(count of routes/rules per feature):\n  none: no route or rule needs Envoy\n")


def test_the_example_of_docs_split_md_runs_as_shown(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/split.md showed `l7fp split examples/front-proxy.yaml`, a file that did not
    exist. Every line the doc shows is printed, in that order (the command may print more)."""
    doc = (REPO / "docs" / "split.md").read_text()
    block = doc.split("$ l7fp split examples/front-proxy.yaml\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(REPO)
    assert main(["split", "examples/front-proxy.yaml"]) == 0
    out = iter(capsys.readouterr().out.splitlines())
    missing = [ln for ln in block.splitlines() if ln not in out]  # `in` consumes: keeps order
    assert missing == []
