"""`l7fp split` on files: text and --json output, errors, and the shared corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xds_server.cli import main

CORPUS = Path("/work/shared/corpus/wild")
BOOTSTRAP = {
    "static_resources": {
        "listeners": [{
            "name": "web", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 8080}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                             "http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "web",
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    "route_config": {"name": "rc", "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": [
                        {"name": "fast", "match": {"prefix": "/api"}, "route": {"cluster": "app", "timeout": "0s"}},
                        {"name": "retry", "match": {"prefix": "/r"},
                         "route": {"cluster": "app", "timeout": "0s",
                                   "retry_policy": {"retry_on": "retriable-4xx"}}},
                        {"name": "slow", "match": {"prefix": "/"},
                         "route": {"cluster": "app", "timeout": "0s", "retry_policy": {"retry_on": "envoy-ratelimited"}}},
                    ]}]}}}]}]}],
        "clusters": [{"name": "app", "type": "STRICT_DNS", "load_assignment": {
            "cluster_name": "app", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "app", "port_value": 80}}}}]}]}}],
    }}
XDS = {"resources": [{"@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", "name": "r",
                      "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                          {"match": {"safe_regex": {"regex": "(a)\\1"}}, "route": {"cluster": "x", "timeout": "0s"}}]}]}]}


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(BOOTSTRAP))
    (tmp_path / "rds.json").write_text(json.dumps(XDS))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"static_resources": {"listeners": [{"bogus": 1}]}}))
    return tmp_path


def test_json_output(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["split", "--json", str(files)]) == 0
    out = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in out["routes"]}
    assert set(by_name["fast"]) == {"file", "listener", "route_config", "virtual_host", "name", "verdict",
                                    "reason", "placement"}
    assert by_name["fast"]["placement"] == "mesh"  # an Envoy file: what a sidecar applies
    assert by_name["fast"]["verdict"] == "KERNEL" and by_name["fast"]["listener"] == "web"
    assert by_name["slow"]["verdict"] == "ENVOY" and "retry_on=envoy-ratelimited can fire" in by_name["slow"]["reason"]
    assert by_name["retry"]["verdict"] == "KERNEL"  # the data path retries on 409
    assert by_name["#0"]["verdict"] == "ENVOY" and "no small DFA" in by_name["#0"]["reason"]
    cov = out["coverage"]
    assert cov["routes"] == {"kernel": 2, "total": 4}
    assert cov["by_format"]["envoy-static"]["routes"] == {"kernel": 2, "total": 3}
    assert cov["by_format"]["envoy-static"]["skipped_resources"] == 1
    assert cov["by_format"]["envoy-xds"]["routes"] == {"kernel": 0, "total": 1}


def test_text_output_and_what_if(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["split", "--explain", str(files / "envoy.yaml")]) == 0
    out = capsys.readouterr().out
    assert "KERNEL fast" in out and "ENVOY  slow" in out and "coverage: routes 2/3 (66.7%)" in out
    # status retries are built (the default): the what-if changes nothing any more
    assert main(["split", "--assume", "status-retries", str(files / "envoy.yaml")]) == 0
    assert "coverage: routes 2/3 (66.7%)" in capsys.readouterr().out


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "xds_server", "split", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not CORPUS.is_dir(), reason="the shared corpus is not on this machine")
def test_corpus_envoy_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["split", "--json", str(CORPUS / "envoyproxy__examples")]) == 0
    cov = json.loads(capsys.readouterr().out)["coverage"]
    assert cov["routes"]["total"] >= 30
    assert 0 < cov["routes"]["kernel"] < cov["routes"]["total"]


def test_plan_output(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["split", "--plan", str(files / "envoy.yaml")]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    lis = entry["plan"]["listeners"][0]
    assert (lis["name"], lis["port"], lis["direction"]) == ("web", 8080, "outbound")
    fast = lis["virtual_hosts"][0]["routes"][0]
    assert fast["verdict"] == "KERNEL" and fast["action"]["type"] == "ClusterAction"
    assert fast["match"] == {**fast["match"], "path_kind": "prefix", "path": "/api"}


def test_relative_path_through_parent_dir(files: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`l7fp split ../dir` reads the files under it (only dot-dirs *below* the named dir are skipped)."""
    (files / ".hidden").mkdir()
    (files / ".hidden" / "x.yaml").write_text(yaml.safe_dump(BOOTSTRAP))
    sub = files / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    assert main(["split", "--json", ".."]) == 0
    cov = json.loads(capsys.readouterr().out)["coverage"]
    assert cov["routes"] == {"kernel": 2, "total": 4}


def test_contrib_filter_is_opaque_and_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A filter whose type L7FP's proto library lacks (a contrib extension) is kept opaque for
    Envoy: the listener is read, its routes are ENVOY because of that filter, named."""
    boot = json.loads(json.dumps(BOOTSTRAP))
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(0, {"name": "envoy.filters.http.golang", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.golang.v3alpha.Config"}})
    hcm["routeConfig"] = hcm.pop("route_config")  # camelCase spelling is read too
    (tmp_path / "contrib.yaml").write_text(yaml.safe_dump(boot))
    assert main(["split", "--json", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["listener"], r["name"], r["verdict"]) for r in out["routes"]] == [
        ("web", "fast", "ENVOY"), ("web", "retry", "ENVOY"), ("web", "slow", "ENVOY")]
    assert all("http filter golang" in r["reason"] for r in out["routes"])
    (info,) = out["files"].values()
    assert info["skipped"] == [] and len(info["opaque"]) == 1
    assert "golang.v3alpha.Config kept opaque" in info["opaque"][0]
    assert out["coverage"]["routes"] == {"kernel": 0, "total": 3}


def test_unreadable_listener_routes_stay_in_the_denominator(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A listener L7FP's proto library cannot read (a field of Listener itself it lacks) is
    still Envoy's to serve: its routes count as ENVOY, naming why, not as nothing."""
    boot = json.loads(json.dumps(BOOTSTRAP))
    boot["static_resources"]["listeners"][0]["brand_new_field"] = True
    (tmp_path / "newer.yaml").write_text(yaml.safe_dump(boot))
    assert main(["split", "--json", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["listener"], r["verdict"]) for r in out["routes"]] == [("web", "ENVOY")] * 3
    assert all(r["reason"].startswith("not readable by L7FP") and "brand_new_field" in r["reason"]
               for r in out["routes"])
    assert out["coverage"]["routes"] == {"kernel": 0, "total": 3}


def test_a_tracing_inbound_listener_says_who_may_merge_it(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """KERNEL for a tracing INBOUND listener holds only behind some callers
    (fastpath.inbound_merge.trace_refusal): the text output says so; the
    OUTBOUND one has no such note."""
    boot = json.loads(json.dumps(BOOTSTRAP))
    web = boot["static_resources"]["listeners"][0]
    web["filter_chains"][0]["filters"][0]["typed_config"]["tracing"] = {
        "random_sampling": {"value": 30}}
    out_web = json.loads(json.dumps(web))
    web["traffic_direction"] = "INBOUND"
    out_web.update(name="out", traffic_direction="OUTBOUND")
    out_web["address"]["socket_address"]["port_value"] = 8081
    boot["static_resources"]["listeners"].append(out_web)
    (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(boot))
    assert main(["split", str(tmp_path / "envoy.yaml")]) == 0
    lines = {ln.split()[1]: ln for ln in capsys.readouterr().out.splitlines()
             if ln.startswith("  listener ")}
    assert "inbound" in lines["web"] and " KERNEL tracing: 3000/10000 sampled" in lines["web"], lines
    assert lines["web"].endswith("; KERNEL only behind OUTBOUND tracing callers with the same "
                                 "tracer whose sampling it keeps, else Envoy "
                                 "(fastpath.inbound_merge.trace_refusal)"), lines
    assert lines["out"].endswith("sampled (the id's version digit)"), lines
