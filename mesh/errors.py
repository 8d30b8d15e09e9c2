"""The local mesh's errors, in a module of their own so that mesh.claim (which
mesh.runner imports) can raise the one `MeshBusy` every caller catches."""

from __future__ import annotations


class MeshError(RuntimeError):
    """The mesh could not be started or found; the message says why."""


class MeshBusy(MeshError):
    """A live process runs or starts a mesh of this name (mesh.claim); `what` ends a
    sentence about it ("is running (daemon pid 12, 3 pods)"), for callers' own advice."""

    def __init__(self, name: str, what: str) -> None:
        super().__init__(f"mesh {name!r} {what}: `l7fp mesh down --name {name}` first "
                         "(if it is yours), or give another --name")
        self.name, self.what = name, what
