"""`l7fp serve` (and the CLI) used the wrong way: one line naming the bad flag, a non-zero exit, no traceback.

Found on a first day with L7FP (docs/first-day.md): a busy `--xds-port` ended
in grpclib's "RuntimeError: Server is not started" traceback, and
`--fastpath on` without root in the agent's RuntimeError traceback.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from xds_server.cli import main

from .conftest import REPO


def serve(config: str, *flags: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "xds_server", "serve", "--config", config, "--fastpath", "off",
            "--xds-address", "127.0.0.1", *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.fixture
def busy_port():
    """A port some other process listens on (here: this test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("flag", ["--xds-port", "--admin-port"])
def test_port_in_use_names_the_flag(config_dir, busy_port, flag):
    other = "--admin-port" if flag == "--xds-port" else "--xds-port"
    out = serve(str(config_dir.path), flag, str(busy_port), other, "0")
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().endswith(
        f"l7fp serve: {flag} {busy_port}: cannot listen on 127.0.0.1:{busy_port}: Address already in use")
    assert "Traceback" not in out.stderr, out.stderr


def test_port_out_of_range_is_a_usage_error(config_dir):
    out = serve(str(config_dir.path), "--xds-port", "99999")
    assert out.returncode == 2
    assert "--xds-port: '99999': expected a port number 0-65535" in out.stderr
    assert "Traceback" not in out.stderr
    boot = subprocess.run([sys.executable, "-m", "xds_server", "bootstrap", "--node-id", "n",
                           "--admin-port", "99999"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert boot.returncode == 2 and "--admin-port: '99999': expected a port number" in boot.stderr


def test_fastpath_on_where_it_cannot_run_exits_with_why(config_dir, monkeypatch):
    """A non-root user (the agent's kernel_ready() says why); in-process, as CI runs as root."""
    from fastpath import agent

    monkeypatch.setattr(agent, "kernel_ready", lambda: "not root")
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--config", str(config_dir.path), "--fastpath", "on", "--xds-address",
              "127.0.0.1", "--xds-port", "0", "--admin-port", "0"])
    assert str(exc.value.code) == "l7fp serve: --fastpath on: the kernel fast path cannot run: not root"


def test_output_piped_into_head_ends_quietly():
    """`l7fp split --plan DIR | head -1`: the reader closes the pipe early. The output
    (about 210 kB) is more than a pipe holds, so the writer meets the closed pipe."""
    argv = [sys.executable, "-m", "xds_server", "split", "--plan", *["compose/demo"] * 3]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # as `head` does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_refused_reload_is_counted_and_cleared_when_undone(config_dir):
    """A broken edit shows in /metrics (l7fp_config_errors_total) and /debug/adsz
    (last_error) while it is on disk; undoing it clears last_error."""
    from xds_server.server import XdsServer
    from xds_server.sources.files import DirectorySource

    from .helpers import cluster

    config_dir.write("c.yaml", [cluster("a")])
    good = (config_dir.path / "c.yaml").read_text()
    src = DirectorySource(config_dir.path)
    server = XdsServer([src])
    assert src.load()
    config_dir.write_text("c.yaml", "resources: [ {")
    assert not src.load()
    assert server.metrics.registry.get_sample_value("l7fp_config_errors_total") == 1
    assert src.status()["last_error"].startswith("c.yaml: while parsing")
    config_dir.write_text("c.yaml", good)
    assert not src.load()  # the same config as the one served: nothing to push
    assert src.status()["last_error"] == ""
    assert server.metrics.registry.get_sample_value("l7fp_config_errors_total") == 1


def test_missing_mesh_file_is_named(config_dir):
    argv = [sys.executable, "-m", "xds_server", "serve", "--policies", "tests/istio/bookinfo",
            "--mesh-file", str(config_dir.path / "absent.yaml"), "--xds-port", "0", "--admin-port", "0"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 1
    assert out.stderr.strip().endswith(f"l7fp serve: --mesh-file {config_dir.path / 'absent.yaml'}: "
                                       "no such file or directory")


def test_empty_config_dir_is_said(config_dir, caplog):
    from xds_server.sources.files import DirectorySource

    assert DirectorySource(config_dir.path).load()
    assert f"{config_dir.path} has no resource files (*.yaml, *.yml, *.json): serving an empty config" \
        in caplog.text


def test_single_envoy_demo_usage_and_bad_count() -> None:
    """`python -m xds_server.demo --help` said `usage: ... demo demo` and called itself the
    interim `l7fp demo`; `--requests 0` was accepted."""
    out = subprocess.run([sys.executable, "-m", "xds_server.demo", "--requests", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines()[0].startswith("usage: python -m xds_server.demo [-h]")
    assert out.stderr.splitlines()[-1] == ("python -m xds_server.demo: error: argument --requests: "
                                           "'0': expected a whole number 1-10000")


@pytest.mark.parametrize("count", ["-1", "4294967296", "4294967297", "\u00b2"])
def test_access_log_sampling_must_be_a_count(count: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--fastpath-access-log -1` was taken and handed to the data path as a sampling rate;
    the data path's rate is a __u32 written through ctypes, which wrapped 4294967296 to
    0 (none) and 4294967297 to 1 (every request)."""
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--fastpath-access-log", count])
    assert exc.value.code == 2
    assert (f"argument --fastpath-access-log: {count!r}: expected a whole number 0-4294967295"
            in capsys.readouterr().err)


@pytest.mark.parametrize("node_id", ["", " "])
def test_bootstrap_with_an_empty_node_id(node_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--node-id ''` printed a bootstrap that Envoy refuses ("ads: node 'id' and 'cluster'
    are required"); `--node-id ' '` was refused as `--node-id ''`."""
    assert main(["bootstrap", "--node-id", node_id]) == 2
    assert capsys.readouterr() == ("", f"l7fp bootstrap: --node-id {node_id!r}: Envoy's ADS needs "
                                       "a node id\n")


def test_debounce_and_capture_ports_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    """`--debounce-ms -5` and `--capture-ports 15001,99999` were taken."""
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--debounce-ms", "-5"])
    assert exc.value.code == 2
    assert "argument --debounce-ms: '-5': expected a whole number of milliseconds >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--policies", str(REPO / "tests" / "istio" / "bookinfo" / "policies.yaml"),
              "--capture-ports", "15001,99999", "--xds-port", "0", "--admin-port", "0", "--fastpath", "off"])
    assert exc.value.code == "l7fp serve: --capture-ports '15001,99999': expected OUT,IN (two ports 1-65535)"
