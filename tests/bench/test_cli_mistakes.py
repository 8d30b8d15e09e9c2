"""`l7fp bench` given a wrong argument: one line naming the flag, exit 2, never a
traceback, and no run started (in-process: an exception that escapes fails the test)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xds_server.cli import main


@pytest.mark.parametrize(("argv", "said"), [
    (["--rates", "500,fast"], "--rates '500,fast': expected comma-separated numbers > 0 (req/s)"),
    (["--envoy-concurrency", "0"], "--envoy-concurrency 0: must be 1 or more"),
    (["--scenario", "leef"], "--scenario: unknown scenario 'leef'; choose from leaf, "),
])
def test_bench_bad_values_name_the_flag(argv: list[str], said: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`--rates a` said `bad scenario or --rates: could not convert string to float`."""
    assert main(["bench", *argv]) == 2
    assert capsys.readouterr().err.startswith(f"l7fp bench: {said}")


def test_bench_out_on_a_file_stops_before_any_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`--out FILE` ended in a FileExistsError traceback (as root: the check is after the
    root check, so the uid is faked; nothing else runs before the answer)."""
    out = tmp_path / "taken"
    out.write_text("")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert main(["bench", "--out", str(out), "--scenario", "leaf"]) == 2
    assert capsys.readouterr().err == (
        f"l7fp bench: --out {out}: cannot write there: {out}: File exists\n")
