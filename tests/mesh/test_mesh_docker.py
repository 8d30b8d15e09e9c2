"""`--backend docker`: compose services become SDK calls; no engine gives one clear error.

There is no Docker engine on the project's machines, so the SDK calls are
checked against a recording client (the translation logic), and the real SDK
is used for the no-engine error.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mesh import compose, docker_backend, spec

DEMO = Path(__file__).resolve().parents[2] / "compose" / "demo" / "mesh.yaml"


def test_no_engine_is_one_clear_error(tmp_path: Path) -> None:
    env = {"DOCKER_HOST": f"unix://{tmp_path}/absent.sock", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "xds_server", "mesh", "up", str(DEMO), "--backend",
                        "docker", "--name", "dk"], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 1
    assert r.stderr.startswith("l7fp mesh: no Docker engine reachable") and r.stderr.count("\n") == 1


def test_sidecar_shares_the_app_netns_as_uid_1337() -> None:
    doc, _ = compose.project(spec.load(DEMO))
    kw = docker_backend.container_kwargs("user-0-envoy", doc["services"]["user-0-envoy"], "demo",
                                         Path("/p"))
    assert kw["network_mode"] == "container:l7fp-demo-user-0" and kw["user"] == "1337:1337"
    assert kw["volumes"] == {"/p/docker/bootstrap": {"bind": "/etc/l7fp/bootstrap", "mode": "ro"}}
    assert kw["labels"] == {"l7fp.mesh": "demo"}
    cp = docker_backend.container_kwargs("control-plane", doc["services"]["control-plane"], "demo",
                                         Path("/p"))
    assert cp["privileged"] is True and cp["pid_mode"] == "host"
    assert cp["ports"] == {"15014/tcp": ("127.0.0.1", 15014)}
    order = docker_backend.ordered(doc)
    assert order[0] == "control-plane"
    assert order.index("user-0") < order.index("user-0-init") < order.index("user-0-envoy")


class Recorder:
    """Stands in for docker.DockerClient in this unit test only: records calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        rec = self

        class Obj:
            def __init__(self, name: str) -> None:
                self.name = name

            def start(self) -> None:
                rec.calls.append(("start", self.name))

            def wait(self, timeout: int) -> dict[str, int]:
                return {"StatusCode": 0}

            def connect(self, ctr: Any, **kw: Any) -> None:
                rec.calls.append(("connect", (ctr.name, kw["ipv4_address"])))

            def disconnect(self, ctr: Any) -> None:
                pass

        class Coll:
            def __init__(self, kind: str) -> None:
                self.kind = kind

            def create(self, *a: Any, **kw: Any) -> Obj:
                rec.calls.append((f"{self.kind}.create", kw.get("name", a[0] if a else None)))
                return Obj(kw.get("name") or a[0])

            def run(self, **kw: Any) -> Obj:
                rec.calls.append((f"{self.kind}.run", kw["name"]))
                return Obj(kw["name"])

            def list(self, **kw: Any) -> list[Obj]:
                return [Obj("img")]

        self.networks, self.containers, self.images = Coll("net"), Coll("ctr"), Coll("img")


def test_up_creates_in_dependency_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("docker")
    monkeypatch.setattr(docker_backend, "state_dir", lambda name: tmp_path / name)
    rec = Recorder()
    docker_backend.up(spec.load(DEMO, "dk"), rec)
    names = [c[1] for c in rec.calls if c[0] in ("ctr.create", "ctr.run")]
    assert names[0] == "l7fp-dk-control-plane" and len(names) == 1 + 3 * 12
    assert ("connect", ("l7fp-dk-frontend-0", "198.18.250.2")) in rec.calls
    assert (tmp_path / "dk" / "docker" / "docker-compose.yml").exists()
