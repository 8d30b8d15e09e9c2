"""`l7fp split FILE` on YAML with the mistakes users make: one clear line naming the file and
the bad input, in Envoy 1.40's words where Envoy rejects the file (seen with `envoy --mode
validate`; duplicate names with a running Envoy), exit 1 only when the file is unusable.
The validate check itself is `test_envoy_agrees` (real Envoy)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.split.test_cli import BOOTSTRAP
from xds_server.cli import main


def bootstrap() -> dict[str, Any]:
    return copy.deepcopy(BOOTSTRAP)


def hcm(boot: dict[str, Any]) -> dict[str, Any]:
    return boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]  # type: ignore[no-any-return]


def tab() -> str:
    """A tab in the indentation of line 13 (`stat_prefix`), as an editor inserts it."""
    text = yaml.safe_dump(bootstrap(), sort_keys=False)
    assert "\n          stat_prefix" in text
    return text.replace("\n          stat_prefix", "\n\t  stat_prefix", 1)


def wrong_type() -> str:
    boot = bootstrap()
    hcm(boot)["@type"] = hcm(boot)["@type"].replace("HttpConnectionManager", "HttpConectionManager")
    return yaml.safe_dump(boot)


def missing_cluster() -> str:
    boot = bootstrap()
    hcm(boot)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"] = "nope"
    return yaml.safe_dump(boot)


def missing_weighted_cluster() -> str:
    boot = bootstrap()
    action = hcm(boot)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    action["weighted_clusters"] = {"clusters": [{"name": action.pop("cluster"), "weight": 1},
                                                {"name": "nope", "weight": 1}]}
    return yaml.safe_dump(boot)


def missing_mirror_cluster() -> str:
    boot = bootstrap()
    action = hcm(boot)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    action["request_mirror_policies"] = [{"cluster": "nope"}]
    return yaml.safe_dump(boot)


def no_chains() -> str:
    boot = bootstrap()
    del boot["static_resources"]["listeners"][0]["filter_chains"]
    return yaml.safe_dump(boot)


def no_filters() -> str:
    boot = bootstrap()
    boot["static_resources"]["listeners"][0]["filter_chains"] = [{}]
    return yaml.safe_dump(boot)


def untyped_router() -> str:
    boot = bootstrap()
    hcm(boot)["http_filters"] = [{"name": "envoy.filters.http.router"}]
    return yaml.safe_dump(boot)


CORS = {"name": "envoy.filters.http.cors",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}}


def router_first() -> str:
    boot = bootstrap()
    hcm(boot)["http_filters"].append(CORS)
    return yaml.safe_dump(boot)


def no_router() -> str:
    boot = bootstrap()
    hcm(boot)["http_filters"] = [CORS]
    return yaml.safe_dump(boot)


def no_http_filters() -> str:
    boot = bootstrap()
    hcm(boot)["http_filters"] = []
    return yaml.safe_dump(boot)


def duplicate() -> str:
    boot = bootstrap()
    second = copy.deepcopy(boot["static_resources"]["listeners"][0])
    second["address"]["socket_address"]["port_value"] = 8081
    boot["static_resources"]["listeners"].append(second)
    return yaml.safe_dump(boot)


# (file text, exit status, the line, Envoy 1.40's verdict: None = accepts, else its words)
CASES = {
    "tab": (tab, 1, "unreadable: not YAML/JSON: line 13, column 1: found character '\\t' that cannot "
            "start any token (a tab: YAML indents with spaces)", "illegal tab when looking for indentation"),
    "wrong_type": (wrong_type, 1, "skipped resource: envoy.config.listener.v3.Listener 'web': filter_chains[0]"
                   ".filters[0].typed_config: unknown @type 'envoy.extensions.filters.network.http_connection_"
                   "manager.v3.HttpConectionManager' (did you mean 'envoy.extensions.filters.network.http_"
                   "connection_manager.v3.HttpConnectionManager'?): Envoy rejects it", "could not find @type"),
    "missing_cluster": (missing_cluster, 1, "invalid: listener 'web': route config 'rc': unknown cluster 'nope': "
                        "Envoy rejects it (\"route: unknown cluster 'nope'\")", "route: unknown cluster 'nope'"),
    "missing_weighted_cluster": (missing_weighted_cluster, 1, "invalid: listener 'web': route config 'rc': unknown "
                                 "cluster 'nope': Envoy rejects it (\"route: unknown weighted cluster 'nope'\")",
                                 "route: unknown weighted cluster 'nope'"),
    "missing_mirror_cluster": (missing_mirror_cluster, 1, "invalid: listener 'web': route config 'rc': unknown "
                               "cluster 'nope': Envoy rejects it (\"route: unknown shadow cluster 'nope'\")",
                               "route: unknown shadow cluster 'nope'"),
    "no_chains": (no_chains, 1, "invalid: listener 'web': no filter_chains: Envoy rejects it (\"error adding "
                  "listener '0.0.0.0:8080': no filter chains specified\")", "no filter chains specified"),
    "untyped_router": (untyped_router, 1, "invalid: listener 'web': filter_chains[0].filters[0].typed_config."
                       "http_filters[0]: no typed_config: Envoy rejects it (\"Didn't find a registered "
                       "implementation for 'envoy.filters.http.router' with type URL: ''\")",
                       "Didn't find a registered implementation for 'envoy.filters.http.router' with type URL: ''"),
    "no_filters": (no_filters, 0, "note: listener 'web': filter_chains[0] has no filters: Envoy accepts it "
                   "and closes those connections; nothing to split", None),
    "router_first": (router_first, 1, "invalid: listener 'web': filter_chains[0].filters[0].typed_config."
                     "http_filters[0]: Envoy rejects it (\"Error: terminal filter named envoy.filters.http.router",
                     "terminal filter named envoy.filters.http.router of type envoy.filters.http.router must be "
                     "the last filter in a http filter chain"),
    "no_router": (no_router, 1, "invalid: listener 'web': filter_chains[0].filters[0].typed_config.http_filters[0]: "
                  "Envoy rejects it (\"Error: non-terminal filter named envoy.filters.http.cors",
                  "non-terminal filter named envoy.filters.http.cors of type envoy.filters.http.cors is the last "
                  "filter in a http filter chain"),
    # accepted, but a request then waits 5 minutes for a 504 (seen): ENVOY, said on the route
    "no_http_filters": (no_http_filters, 0, "listener web 0.0.0.0:8080 outbound route_config=rc ENVOY", None),
    "duplicate": (duplicate, 0, "note: listener 'web' at 0.0.0.0:8081: duplicate name: Envoy 1.40 serves only "
                  "the first listener 'web' (0.0.0.0:8080); this one is ignored", None),
}


def run_split(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xds_server", "split", str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_clear_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, status, line, _ = CASES[case]
    f = tmp_path / f"{case}.yaml"
    f.write_text(make())
    assert main(["split", str(f)]) == status
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"== {f} [{'unrecognized' if case == 'tab' else 'envoy-static'}]"
    assert lines[1].strip().startswith(line), lines[1]
    assert err == (f"l7fp split: {f}: unusable (see above)\n" if status else "")


def test_exit_status_of_the_command(tmp_path: Path) -> None:
    """The same through the real command line: status 1, no traceback."""
    f = tmp_path / "wrong_type.yaml"
    f.write_text(wrong_type())
    proc = run_split(f)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "did you mean" in proc.stdout


def test_a_directory_is_a_survey(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Unusable files found under a directory are reported, not failed (the corpus has some)."""
    (tmp_path / "tab.yaml").write_text(tab())
    assert main(["split", str(tmp_path)]) == 0
    assert "unreadable: not YAML/JSON: line 13" in capsys.readouterr().out


@pytest.mark.envoy
def test_envoy_agrees(envoy_bin: str, tmp_path: Path) -> None:
    """Each case's verdict is Envoy 1.40's (`envoy --mode validate`)."""
    for case, (make, status, _, words) in sorted(CASES.items()):
        assert (words is None) == (status == 0)  # exit 1 exactly where Envoy can't run the file
        f = tmp_path / f"{case}.yaml"
        f.write_text(make())
        proc = subprocess.run([envoy_bin, "--mode", "validate", "-c", str(f), "-l", "critical",
                               "--base-id", str(900 + len(case))], capture_output=True, text=True, timeout=60)
        out = proc.stdout + proc.stderr
        if words is None:
            assert proc.returncode == 0 and f"configuration '{f}' OK" in out, (case, out[-500:])
        else:
            assert proc.returncode != 0 and words in out, (case, out[-500:])
