"""`l7fp istio` given a wrong file: one line naming the file or flag, never a traceback.

In-process (`xds_server.cli.main`), so an exception that escapes fails the test
instead of being printed by a subprocess.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xds_server.cli import main

HERE = Path(__file__).parent
POLICIES = str(HERE / "bookinfo" / "policies.yaml")


def test_broken_mesh_file_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A YAML error in --mesh-file escaped as PyYAML's traceback (serve's too); the flag
    is named as serve names it."""
    bad = tmp_path / "mesh.yaml"
    bad.write_text("services:\n  a: [1,\n")
    assert main(["istio", "check", POLICIES, "--mesh-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == (f"l7fp istio: --mesh-file {bad}: not valid YAML/JSON: line 3, column 1: "
                   "expected the node content, but found '<stream end>'\n")


@pytest.mark.parametrize("which", ["policies", "mesh-file"])
def test_a_file_that_is_not_utf8_is_named(which: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """It said "'utf-8' codec can't decode byte 0xe9 in position 12: ..." without the file
    (the mesh file's: 'not valid YAML/JSON')."""
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("services: {caf\u00e9: {}}\n".encode("latin-1"))
    args = [str(bad)] if which == "policies" else [POLICIES, "--mesh-file", str(bad)]
    flag = "" if which == "policies" else "--mesh-file "
    assert main(["istio", "check", *args]) == 2
    assert capsys.readouterr().err == f"l7fp istio: {flag}{bad}: not UTF-8 text (byte 14)\n"


def test_missing_mesh_file_names_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It said `[Errno 2] No such file or directory: '...'`, without the flag."""
    assert main(["istio", "check", POLICIES, "--mesh-file", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err == (
        f"l7fp istio: --mesh-file {tmp_path / 'nope.yaml'}: no such file or directory\n")


def test_broken_policy_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PyYAML's several lines (caret drawing, `in "<unicode string>"`) became one."""
    (tmp_path / "vs.yaml").write_text("kind: VirtualService\nspec: {hosts: [a]\n")
    assert main(["istio", "check", str(tmp_path / "vs.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unicode string" not in err
    assert err.startswith(f"l7fp istio: {tmp_path / 'vs.yaml'}: invalid YAML: line 3, column 1: ")


def test_serve_names_the_flag_of_the_file_that_does_not_load(tmp_path: Path) -> None:
    """`serve --policies P --mesh-file BROKEN` said `--policies P: BROKEN: ...` (a traceback
    before that): the flag named is the broken file's."""
    bad = tmp_path / "mesh.yaml"
    bad.write_text("services:\n  a: [1,\n")
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--policies", POLICIES, "--mesh-file", str(bad), "--xds-port", "0",
              "--admin-port", "0", "--fastpath", "off"])
    assert str(exc.value.code) == (f"l7fp serve: --mesh-file {bad}: not valid YAML/JSON: line 3, "
                                   "column 1: expected the node content, but found '<stream end>'")
