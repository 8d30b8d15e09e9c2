"""Config source: a directory of Envoy resource files (Envoy's file-based xDS format).

Owned by xds_server; `l7fp serve --config DIR` creates one. Format and rules
are the contract in docs/contracts.md ("Config directory"). The directory is
loaded as a whole: any bad file keeps the previous good config serving and
logs one line `FILE: FIELD: problem` per problem.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any as AnyT

import betterproto2
import yaml

from xds_server import consistency
from xds_server import resources as res
from xds_server.node import NodeInfo
from xds_server.snapshot import Snapshot
from xds_server.sources import cilium_files
from xds_server.sources.base import EMPTY, NodeResources, Source
from xds_server.tasks import cancel_and_wait

log = logging.getLogger(__name__)
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~3x faster on big route tables
MAX_PROBLEMS = 20
SUFFIXES = (".yaml", ".yml", ".json")


class ConfigError(ValueError):
    """A directory that does not load; `problems` are `FILE: FIELD: problem` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ConfigFile:
    path: str  # relative to the directory
    selector_id: str | None
    selector_cluster: str | None
    resources: dict[str, list[betterproto2.Message]] = field(hash=False)
    # a Kubernetes file (CiliumEnvoyConfig, Service, ...): what the endpoints need
    kube: cilium_files.KubeInput | None = field(default=None, hash=False, compare=False)

    def selects(self, node: NodeInfo) -> bool:
        if self.selector_id is not None and not fnmatch.fnmatchcase(node.id, self.selector_id):
            return False
        if self.selector_cluster is not None and not fnmatch.fnmatchcase(
            node.cluster, self.selector_cluster
        ):
            return False
        return True

    @property
    def selector(self) -> tuple[str | None, str | None]:
        return (self.selector_id, self.selector_cluster)


def config_files(directory: Path) -> list[Path]:
    """Every *.yaml/*.yml/*.json under directory, dot-files and dot-dirs skipped, sorted."""
    out = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.suffix in SUFFIXES:
            out.append(p)
    return out


def load_file(path: Path, rel: str) -> ConfigFile:
    """Parse one file; ConfigError with `rel: field: problem` lines."""
    try:
        text = path.read_text()
        docs = [json.loads(text)] if path.suffix == ".json" else list(yaml.load_all(text, Loader=_Loader))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError([f"{rel}: {_one_line(exc)}"]) from None
    if cilium_files.is_kubernetes(docs):
        return _kube_file(docs, rel)
    if len(docs) > 1:
        raise ConfigError([f"{rel}: {len(docs)} YAML documents: expected one with 'resources:' "
                           "(or Kubernetes objects: CiliumEnvoyConfig, Service, ...)"])
    doc = docs[0] if docs else None
    if doc is None:
        doc = {"resources": []}
    if not isinstance(doc, dict):
        raise ConfigError([f"{rel}: top level: expected a mapping with 'resources:'"])
    unknown = set(doc) - {"resources", "node_selector"}
    if unknown:
        raise ConfigError([f"{rel}: {sorted(unknown)[0]}: unknown top-level key (expected resources, node_selector)"])
    sel_id, sel_cluster = _selector(doc.get("node_selector"), rel)
    items = doc.get("resources") or []
    if not isinstance(items, list):
        raise ConfigError([f"{rel}: resources: expected a list"])
    by_type: dict[str, list[betterproto2.Message]] = {}
    problems: list[str] = []
    names: set[tuple[str, str]] = set()
    for i, item in enumerate(items):
        try:
            msg = res.parse_resource(item, f"resources[{i}]")
        except res.ResourceError as exc:
            problems.append(f"{rel}: {exc}")
            continue
        type_url = item["@type"]
        key = (type_url, res.resource_name(msg))
        if key in names:
            problems.append(f"{rel}: resources[{i}]: duplicate {type_url.rsplit('.', 1)[-1]} {key[1]!r}")
        names.add(key)
        by_type.setdefault(type_url, []).append(msg)
    if problems:
        raise ConfigError(problems)
    return ConfigFile(rel, sel_id, sel_cluster, by_type)


def _kube_file(docs: list[AnyT], rel: str) -> ConfigFile:
    """CiliumEnvoyConfigs and Service/EndpointSlice/Pod objects (xds_server.sources.cilium_files)."""
    by_type, kube, problems = cilium_files.read(docs, rel)
    seen: set[tuple[str, str]] = set()
    for type_url, msgs in by_type.items():
        for m in msgs:
            key = (type_url, res.resource_name(m))
            if key in seen:
                problems.append(f"{rel}: duplicate {type_url.rsplit('.', 1)[-1]} {key[1]!r}")
            seen.add(key)
    if problems:
        raise ConfigError(problems)
    return ConfigFile(rel, None, None, by_type, kube)


def _with_endpoints(directory: Path, files: list[ConfigFile], fresh: FileCache,
                    cache: FileCache | None) -> list[ConfigFile]:
    """``files`` plus the assignments cilium-agent would publish for the CECs' Services
    (a file of its own); reused while no Kubernetes file changed."""
    kube = [f for f in files if f.kube is not None]
    if not any(f.kube.refs for f in kube if f.kube is not None):
        return files
    stamp = "|".join(f"{f.path}={fresh[f.path][0]}" for f in kube)
    hit = cache.get(cilium_files.ENDPOINTS_FILE) if cache is not None else None
    if hit is None or hit[0] != stamp:
        eds = cilium_files.endpoints((f.kube for f in kube if f.kube is not None), str(directory))
        hit = (stamp, ConfigFile(cilium_files.ENDPOINTS_FILE, None, None, eds))
    fresh[cilium_files.ENDPOINTS_FILE] = hit
    return files + [hit[1]]


def _selector(sel: AnyT, rel: str) -> tuple[str | None, str | None]:
    if sel is None:
        return None, None
    if not isinstance(sel, dict) or not sel or set(sel) - {"id", "cluster"}:
        raise ConfigError([f"{rel}: node_selector: expected a mapping with id and/or cluster globs"])
    for k, v in sel.items():
        if not isinstance(v, str):
            raise ConfigError([f"{rel}: node_selector.{k}: expected a string glob"])
    return sel.get("id"), sel.get("cluster")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


FileCache = dict[str, tuple[str, ConfigFile]]


def load_directory(directory: Path, cache: FileCache | None = None) -> list[ConfigFile]:
    """Load and check the whole directory; ConfigError listing the problems (at most 20).

    `cache` (owned by the caller) maps a path to its content hash and parsed
    file, so a reload parses only the files whose content changed; updated in place.
    """
    if not directory.is_dir():
        raise ConfigError([f"{directory}: not a directory"])
    files: list[ConfigFile] = []
    problems: list[str] = []
    fresh: FileCache = {}
    for p in config_files(directory):
        rel = str(p.relative_to(directory))
        try:
            stamp = hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
            hit = cache.get(rel) if cache is not None else None
            f = hit[1] if hit is not None and hit[0] == stamp else load_file(p, rel)
            fresh[rel] = (stamp, f)
            files.append(f)
        except OSError as exc:
            problems.append(f"{rel}: {_one_line(exc)}")
        except ConfigError as exc:
            problems.extend(exc.problems)
    if not problems:
        files = _with_endpoints(directory, files, fresh, cache)
        problems = _cross_check(files)
    if problems:
        more = len(problems) - MAX_PROBLEMS
        raise ConfigError(problems[:MAX_PROBLEMS] + ([f"... and {more} more problems"] if more > 0 else []))
    if cache is not None:
        cache.clear()
        cache.update(fresh)
    return files


def _cross_check(files: list[ConfigFile]) -> list[str]:
    """Duplicates and unresolved references, per selector group plus the global files."""
    problems: list[str] = []
    groups = {f.selector for f in files if f.selector != (None, None)} or {(None, None)}
    for sel in sorted(groups, key=str):
        chosen = [f for f in files if f.selector in ((None, None), sel)]
        owner: dict[tuple[str, str], str] = {}
        by_type: dict[str, list[betterproto2.Message]] = {}
        for f in chosen:
            for type_url, msgs in f.resources.items():
                for m in msgs:
                    k = (type_url, res.resource_name(m))
                    if k in owner and owner[k] != f.path:
                        problems.append(
                            f"{f.path}: {type_url.rsplit('.', 1)[-1]} {k[1]!r}: also defined in {owner[k]}"
                        )
                    owner[k] = f.path
                    by_type.setdefault(type_url, []).append(m)
        if problems:
            continue
        try:
            consistency.check(Snapshot.from_messages(by_type, owner))
        except consistency.InconsistentSnapshot as exc:
            problems.extend(exc.problems)
    return sorted(set(problems))


class DirectorySource(Source):
    """Watches DIR and serves its resources; keeps the last good load on errors."""

    name = "files"

    def __init__(self, directory: str | Path, reload_debounce_ms: int = 50) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.files: list[ConfigFile] = []
        self.generation = 0
        self.last_error = ""
        self._debounce = reload_debounce_ms
        self._task: asyncio.Task[None] | None = None
        self._memo: dict[tuple, NodeResources] = {}
        self._cache: FileCache = {}

    def load(self) -> bool:
        """(Re)load the directory; True if it loaded, False (and logged) if not."""
        try:
            files = load_directory(self.directory, self._cache)
        except ConfigError as exc:
            return self._rejected(exc)
        return self._apply(files)

    async def load_async(self) -> bool:
        """load() with the parsing in a worker thread, so streams keep being served."""
        try:
            files = await asyncio.to_thread(load_directory, self.directory, self._cache)
        except ConfigError as exc:
            return self._rejected(exc)
        return self._apply(files)

    def _rejected(self, exc: ConfigError) -> bool:
        self.last_error = str(exc)
        self.rejected()
        what = "config rejected, last good config keeps serving" if self.generation else "config rejected"
        for line in exc.problems:
            log.error("%s: %s", what, line)
        return False

    def _apply(self, files: list[ConfigFile]) -> bool:
        if self.generation and [id(f) for f in files] == [id(f) for f in self.files]:
            if self.last_error:  # a broken edit undone: the error is history, not the state
                log.info("config in %s is good again: the last good config (generation %d) "
                         "is the one on disk", self.directory, self.generation)
                self.last_error = ""
            return False  # nothing changed (an editor's temp file, a touch)
        self.files, self.last_error = files, ""
        self.generation += 1
        self._memo.clear()
        log.info("config loaded from %s: %d files (generation %d)", self.directory, len(files), self.generation)
        if not files:  # a wrong --config DIR looks just like this: say it
            log.warning("%s has no resource files (*.yaml, *.yml, *.json): serving an empty config",
                        self.directory)
        return True

    def resources_for(self, node: NodeInfo) -> NodeResources:
        chosen = tuple(f for f in self.files if f.selects(node))
        if not chosen:
            return EMPTY
        key = ("files", self.generation, tuple(f.path for f in chosen))
        hit = self._memo.get(key)
        if hit is None:
            by_type: dict[str, list[betterproto2.Message]] = {}
            origins: dict[tuple[str, str], str] = {}
            for f in chosen:
                for type_url, msgs in f.resources.items():
                    by_type.setdefault(type_url, []).extend(msgs)
                    for m in msgs:
                        origins[(type_url, res.resource_name(m))] = f.path
            hit = NodeResources(key, by_type, origins)
            self._memo[key] = hit
        return hit

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="l7fp-config-watch")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _watch(self) -> None:
        import watchfiles

        root = self.directory.resolve()

        def relevant(_change: object, path: str) -> bool:
            try:
                rel = Path(path).relative_to(root)
            except ValueError:
                return True
            return not any(part.startswith(".") for part in rel.parts)

        async for _changes in watchfiles.awatch(
            root, debounce=self._debounce, step=20, recursive=True, watch_filter=relevant
        ):
            if await self.load_async():
                self.changed()

    def status(self) -> dict[str, AnyT]:
        return {
            "name": self.name, "directory": str(self.directory), "generation": self.generation,
            "files": [f.path for f in self.files], "last_error": self.last_error,
        }
