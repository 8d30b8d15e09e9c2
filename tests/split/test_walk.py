"""The walk of `l7fp split DIR` (fastpath.inputs_walk): `l7fp split /` died with
`[Errno 2] No such file or directory: '/proc/NNN'` when a process ended while
the walk listed /proc, and a file that could not be read ended the run with a
traceback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fastpath import inputs, inputs_walk
from xds_server.cli import main

REPO = Path(__file__).resolve().parents[2]


def _tree(tmp_path: Path) -> Path:
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "x.yaml").write_text("")
    (tmp_path / "keep").mkdir()
    shutil.copy(REPO / "examples" / "front-proxy.yaml", tmp_path / "keep")
    return tmp_path


def test_a_directory_removed_during_the_walk_is_passed_over(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path)
    real = os.scandir

    def racing(path: os.PathLike[str] | str) -> object:  # as a process ending under /proc
        if not isinstance(path, int) and Path(path).name == "gone":  # rmtree scans fds
            shutil.rmtree(path)
        return real(path)

    monkeypatch.setattr(inputs_walk.os, "scandir", racing)
    assert inputs.files([str(root)]) == [root / "keep" / "front-proxy.yaml"]


def test_an_unlistable_directory_is_reported_and_the_walk_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Root lists any directory whatever its mode, so the refusal is simulated."""
    root = _tree(tmp_path)
    real = os.scandir

    def refusing(path: os.PathLike[str] | str) -> object:
        if not isinstance(path, int) and Path(path).name == "gone":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(inputs_walk.os, "scandir", refusing)
    assert main(["split", str(root)]) == 0  # a directory is a survey
    out = capsys.readouterr().out
    assert f"== {root / 'gone'} [unrecognized]\n   unreadable: cannot list: Permission denied\n" in out
    assert f"== {root / 'keep' / 'front-proxy.yaml'} [envoy-static]" in out


def test_an_unreadable_file_is_reported_as_unreadable(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A real file that even root cannot read: /proc/self/mem at offset 0 is EIO."""
    bad = tmp_path / "mem.yaml"
    bad.symlink_to("/proc/self/mem")
    shutil.copy(REPO / "examples" / "front-proxy.yaml", tmp_path)
    assert main(["split", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"== {bad} [unrecognized]\n   unreadable: cannot read: Input/output error\n" in out
    assert main(["split", str(bad)]) == 1  # named: unusable, as a broken file is
    assert capsys.readouterr().err == f"l7fp split: {bad}: unusable (see above)\n"


def test_pseudo_filesystems_are_not_descended_into(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    listing = inputs_walk.walk(root, skip=frozenset({str(root / "gone")}))
    assert listing.files == [root / "keep" / "front-proxy.yaml"]
    # walked itself when named: the user asked for it
    assert inputs_walk.walk(root / "gone", skip=frozenset({str(root / "gone")})).files == \
        [root / "gone" / "x.yaml"]


def test_pseudo_mounts_read_from_mountinfo() -> None:
    text = ("22 28 0:21 / /proc rw,nosuid - proc proc rw\n"
            "23 28 0:22 / /sys rw - sysfs sysfs rw\n"
            "28 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
            "40 28 0:30 / /my\\040dev rw shared:5 - devtmpfs udev rw\n")
    assert inputs_walk.pseudo_mounts(text) == {"/proc", "/sys", "/my dev"}
    here = inputs_walk._this_hosts_pseudo_mounts()
    assert {"/proc", "/sys"} <= here and "/" not in here
