"""Mesh file: parse and validate a compose-style YAML description of a mesh.

Called by `mesh.runner` (before anything is started) and by the CLI. Owns the
mesh file format documented in docs/mesh.md. Pure: reads files, starts nothing.
Every problem raises `MeshFileError` naming the file and the place in it, so a
bad file stops `mesh up` before a single namespace exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xds_server import yaml_errors
from xds_server.protojson import route_cluster_refs

# Ports the sidecar owns inside every pod (istio-iptables conventions).
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ENVOY_ADMIN_PORT = 15000
RESERVED_PORTS = frozenset({15000, 15001, 15004, 15006, 15008, 15020, 15021, 15090})
SIDECAR_UID = 1337

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$|^[a-z]$")
MESH_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,22}$")
MAX_PODS = 250
SERVICE_KEYS = {"command", "ports", "replicas", "calls", "env", "policy", "app", "user", "labels",
                "service"}
TOP_KEYS = {"name", "namespace", "services", "policies", "istio_policies", "gateways"}
GATEWAY_KEYS = {"labels", "ports"}
POLICY_SIDES = ("outbound", "inbound")
POLICY_KEYS = {"routes", "http_filters", "tracing"}
# HttpConnectionManager.Tracing fields a side's `tracing:` may set (Envoy's names)
TRACING_PERCENTS = ("random_sampling", "client_sampling", "overall_sampling")
TRACING_KEYS = {*TRACING_PERCENTS, "provider"}
ZIPKIN_TYPE = "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig"


class MeshFileError(ValueError):
    """A mesh or policy file is invalid; the message names file and place."""


@dataclass(frozen=True)
class Service:
    """One entry of `services:` (a deployment); each replica becomes a pod `<name>-<i>`.

    `service` is the Kubernetes-style service it serves (default: its own
    name): entries sharing one (e.g. reviews-v1, reviews-v2 with `labels:
    {version: ...}`) are one service with one VIP, as Istio subsets expect.
    """

    name: str
    command: tuple[str, ...]
    ports: tuple[int, ...]
    replicas: int = 1
    calls: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    app: str = "command"  # "command", or "direct_response" (an Envoy leaf, no command)
    user: str = "root"
    labels: dict[str, str] = field(default_factory=dict)  # pod labels (Istio subsets), plus app
    service: str = ""  # the service it belongs to (set by the parser)


@dataclass(frozen=True)
class Gateway:
    """One entry of `gateways:`: an Istio ingress gateway, a pod `<name>-0` whose
    Envoy is a router node with these `labels` (the Gateway objects of
    `istio_policies:` select them) and listens on `ports` (no app, no capture)."""

    name: str
    labels: dict[str, str]
    ports: tuple[int, ...]

    @property
    def pod(self) -> str:
        return f"{self.name}-0"


@dataclass(frozen=True)
class MeshSpec:
    """A validated mesh file. `policies` maps service -> side -> {routes, http_filters,
    tracing} (tracing: HttpConnectionManager.Tracing, or None when the side does not trace);
    `policy_places` maps service -> where its policy was written ("FILE: PLACE", the
    prefix of the errors found in it)."""

    name: str
    namespace: str
    path: Path
    services: dict[str, Service]
    policies: dict[str, dict[str, dict[str, Any]]]
    policy_files: tuple[Path, ...] = ()
    istio_policies: Path | None = None
    policy_places: dict[str, str] = field(default_factory=dict)
    gateways: dict[str, Gateway] = field(default_factory=dict)

    def pod_names(self) -> list[tuple[str, Service]]:
        """(pod name, deployment entry) for every replica, in file order."""
        return [(f"{s.name}-{i}", s) for s in self.services.values() for i in range(s.replicas)]

    def groups(self) -> dict[str, list[Service]]:
        """Service name -> its entries, in file order."""
        out: dict[str, list[Service]] = {}
        for s in self.services.values():
            out.setdefault(s.service, []).append(s)
        return out

    def ports_of(self, service: str) -> tuple[int, ...]:
        return self.groups()[service][0].ports


def _fail(where: str, msg: str) -> MeshFileError:
    return MeshFileError(f"{where}: {msg}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: PyYAML would keep the
    last silently, so a second `services: {a: ...}` entry would replace the first."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor`: the keys it brings may be overridden, as YAML allows
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (list, dict)):
            continue  # not a valid key anyway: construct_mapping says so
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice (lines {seen[key]} and {line})",
                key_node.start_mark)
        seen[key] = line
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _load_yaml(path: Path) -> Any:
    try:
        text = yaml_errors.read_text(path)
    except OSError as exc:
        raise MeshFileError(f"{path}: cannot read: {exc.strerror}") from exc
    except ValueError as exc:  # not UTF-8: was a UnicodeDecodeError traceback
        raise MeshFileError(str(exc)) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise MeshFileError(f"{path}: not valid YAML: {yaml_errors.problem(exc)}") from exc


def load(path: str | Path, name: str | None = None) -> MeshSpec:
    """Read and validate mesh file `path`; `name` overrides its `name:`."""
    path = Path(path).resolve()
    doc = _load_yaml(path)
    where = str(path)
    if not isinstance(doc, dict):
        raise _fail(where, "top level must be a mapping with `services:`")
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise _fail(where, f"unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    mesh_name = name or doc.get("name") or path.parent.name
    if not isinstance(mesh_name, str) or not MESH_NAME_RE.match(mesh_name):
        said = (f"{mesh_name!r} must be lower-case letters, digits and '-', starting with a "
                f"letter, at most 23 characters ({MESH_NAME_RE.pattern})")
        raise _fail("--name" if name else f"{where}: name", said)  # the value the user gave
    namespace = doc.get("namespace", mesh_name)
    if not isinstance(namespace, str) or not NAME_RE.match(namespace):
        raise _fail(f"{where}: namespace", f"{namespace!r} must match {NAME_RE.pattern}")
    services = _parse_services(where, doc.get("services"))
    policies: dict[str, dict[str, dict[str, Any]]] = {}
    places: dict[str, str] = {}
    for sname, raw in (doc.get("services") or {}).items():
        if isinstance(raw, dict) and raw.get("policy") is not None:
            places[sname] = f"{where}: services.{sname}.policy"
            policies[sname] = _parse_policy(places[sname], raw["policy"])
    policy_files: list[Path] = []
    pol_ref = doc.get("policies")
    if pol_ref is not None:
        if not isinstance(pol_ref, str):
            raise _fail(f"{where}: policies", "must be a file name (relative to the mesh file)")
        ppath = (path.parent / pol_ref).resolve()
        policy_files.append(ppath)
        for sname, pol in load_policy_file(ppath).items():
            if sname in policies:
                raise _fail(f"{ppath}: {sname}", f"policy also given inline in {where}")
            policies[sname] = pol
            places[sname] = policy_place(ppath, sname)
    istio = doc.get("istio_policies")
    istio_dir = (path.parent / istio).resolve() if isinstance(istio, str) else None
    if istio is not None and (istio_dir is None or not istio_dir.is_dir()):
        raise _fail(f"{where}: istio_policies", f"{istio!r} is not a directory")
    gateways = _parse_gateways(f"{where}: gateways", doc.get("gateways"), services, istio_dir)
    spec = MeshSpec(mesh_name, namespace, path, services, policies, tuple(policy_files), istio_dir,
                    places, gateways)
    validate_references(spec)
    return spec


def load_policy_file(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """A policy file: mapping service -> {outbound: {...}, inbound: {...}}."""
    doc = _load_yaml(path)
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise _fail(str(path), "must map service names to policies")
    return {str(k): _parse_policy(policy_place(path, str(k)), v) for k, v in doc.items()}


def policy_place(path: Path, service: str) -> str:
    """Where a policy file's entry for `service` is, as its errors name it."""
    return f"{path}: {service}"


def _parse_services(where: str, raw: Any) -> dict[str, Service]:
    if not isinstance(raw, dict) or not raw:
        raise _fail(f"{where}: services", "must be a non-empty mapping of service name to service")
    out: dict[str, Service] = {}
    for sname, sraw in raw.items():
        out[str(sname)] = _parse_service(f"{where}: services.{sname}", str(sname), sraw)
    total = sum(s.replicas for s in out.values())
    if total > MAX_PODS:
        raise _fail(f"{where}: services", f"{total} pods, at most {MAX_PODS}")
    return out


def _check_entry(where: str, kind: str, name: Any, raw: Any, keys: set[str], not_mapping: str) -> None:
    """A named entry of `services:` / `gateways:`: its name, a mapping, known keys."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise _fail(where, f"{kind} name must match {NAME_RE.pattern}")
    if not isinstance(raw, dict):
        raise _fail(where, not_mapping)
    unknown = set(raw) - keys
    if unknown:
        raise _fail(where, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(keys)}")


def _parse_service(where: str, name: str, raw: Any) -> Service:
    _check_entry(where, "service", name, raw, SERVICE_KEYS, "must be a mapping")
    app = raw.get("app", "command")
    if app not in ("command", "direct_response"):
        raise _fail(f"{where}.app", f"{app!r} must be `command` or `direct_response`")
    command = _parse_command(f"{where}.command", raw.get("command"), required=app == "command")
    ports = _parse_ports(f"{where}.ports", raw.get("ports"))
    replicas = raw.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not 1 <= replicas <= 64:
        raise _fail(f"{where}.replicas", f"{replicas!r} must be an integer from 1 to 64")
    calls = raw.get("calls", [])
    if not isinstance(calls, list) or not all(isinstance(c, str) for c in calls):
        raise _fail(f"{where}.calls", "must be a list of service names")
    env = raw.get("env", {})
    if not isinstance(env, dict):
        raise _fail(f"{where}.env", "must be a mapping")
    user = str(raw.get("user", "root"))
    labels = raw.get("labels", {})
    if not isinstance(labels, dict):
        raise _fail(f"{where}.labels", "must be a mapping")
    group = str(raw.get("service", name))
    if not NAME_RE.match(group):
        raise _fail(f"{where}.service", f"{group!r} must match {NAME_RE.pattern}")
    return Service(name, command, ports, replicas, tuple(calls),
                   {str(k): str(v) for k, v in env.items()}, app, user,
                   {"app": group, **{str(k): str(v) for k, v in labels.items()}}, group)


def _parse_gateways(where: str, raw: Any, services: dict[str, Service],
                    istio: Path | None) -> dict[str, Gateway]:
    """`gateways:` (absent: none). Only the Istio importer serves router nodes,
    so a gateway needs `istio_policies:`; its pod must not share a service's
    name or a pod's, and counts toward MAX_PODS."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise _fail(where, "must be a non-empty mapping of gateway name to "
                    "{labels: {...}, ports: [...]}")
    if istio is None:
        raise _fail(where, "a gateway needs `istio_policies:`: only the Istio importer "
                    "(`l7fp serve --policies`) serves gateways (router nodes)")
    pods = {f"{s.name}-{i}" for s in services.values() for i in range(s.replicas)}
    taken = pods | {s.service for s in services.values()} | set(services)
    out: dict[str, Gateway] = {}
    for gname, graw in raw.items():
        gw_where = f"{where}.{gname}"
        _check_entry(gw_where, "gateway", gname, graw, GATEWAY_KEYS,
                     "must be a mapping with `labels:` and `ports:`")
        labels = graw.get("labels")
        if not isinstance(labels, dict) or not labels or not all(
                isinstance(k, str) and isinstance(v, str | int) and not isinstance(v, bool)
                for k, v in labels.items()):
            raise _fail(f"{gw_where}.labels", "must be a non-empty mapping of label to value "
                        "(what the Gateway objects' `selector` matches, e.g. {istio: ingressgateway})")
        gw = Gateway(gname, {k: str(v) for k, v in labels.items()},
                     _parse_ports(f"{gw_where}.ports", graw.get("ports")))
        if gname in taken or gw.pod in taken:
            raise _fail(gw_where, f"name taken by a service or pod ({gname!r}, pod {gw.pod!r})")
        taken |= {gname, gw.pod}
        out[gname] = gw
    total = len(pods) + len(out)
    if total > MAX_PODS:
        raise _fail(where, f"{total} pods with the gateways, at most {MAX_PODS}")
    return out


def _parse_command(where: str, raw: Any, required: bool) -> tuple[str, ...]:
    if raw is None:
        if required:
            raise _fail(where, "missing: every service needs a command (or `app: direct_response`)")
        return ()
    if isinstance(raw, str):
        raw = raw.split()
    if not isinstance(raw, list) or not raw or not all(isinstance(a, str | int) for a in raw):
        raise _fail(where, "must be a non-empty list of strings (or one string)")
    return tuple(str(a) for a in raw)


def _parse_ports(where: str, raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or not raw:
        raise _fail(where, "must be a non-empty list of TCP ports")
    seen: set[int] = set()
    for p in raw:
        if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= 65535:
            raise _fail(where, f"{p!r} is not a TCP port")
        if p in RESERVED_PORTS:
            raise _fail(where, f"port {p} clashes with a sidecar port ({sorted(RESERVED_PORTS)})")
        if p in seen:
            raise _fail(where, f"port {p} listed twice")
        seen.add(p)
    return tuple(raw)


def _parse_policy(where: str, raw: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict):
        raise _fail(where, "must be a mapping with `outbound:` and/or `inbound:`")
    unknown = set(raw) - set(POLICY_SIDES)
    if unknown:
        raise _fail(where, f"unknown key(s) {sorted(unknown)}; allowed: {list(POLICY_SIDES)}")
    out: dict[str, dict[str, Any]] = {}
    for side in POLICY_SIDES:
        sraw = raw.get(side) or {}
        if not isinstance(sraw, dict) or set(sraw) - POLICY_KEYS:
            raise _fail(f"{where}.{side}", f"must be a mapping with keys among {sorted(POLICY_KEYS)}")
        side_pol: dict[str, Any] = {}
        for key in ("routes", "http_filters"):
            val = sraw.get(key, [])
            if not isinstance(val, list) or not all(isinstance(v, dict) for v in val):
                raise _fail(f"{where}.{side}.{key}", "must be a list of mappings (Envoy JSON form)")
            side_pol[key] = val
        for i, flt in enumerate(side_pol["http_filters"]):
            if "name" not in flt or "typed_config" not in flt:
                raise _fail(f"{where}.{side}.http_filters[{i}]", "needs `name` and `typed_config`")
        side_pol["tracing"] = _parse_tracing(f"{where}.{side}.tracing", sraw.get("tracing"))
        out[side] = side_pol
    return out


def _parse_tracing(where: str, raw: Any) -> dict[str, Any] | None:
    """A side's `tracing:`, HttpConnectionManager.Tracing in Envoy's form: the
    three sampling Percents ({value: 0..100}) and a Zipkin `provider` whose
    `collector_cluster` names a service of the mesh (validate_references
    checks it). `{}` traces with Envoy's defaults (100 %); absent: None."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - TRACING_KEYS:
        raise _fail(where, f"must be a mapping with keys among {sorted(TRACING_KEYS)}")
    for key in TRACING_PERCENTS:
        val = raw.get(key)
        if val is None:
            continue
        num = val.get("value") if isinstance(val, dict) and set(val) == {"value"} else None
        if not isinstance(num, int | float) or isinstance(num, bool) or not 0 <= num <= 100:
            raise _fail(f"{where}.{key}", f"{val!r} must be Envoy's Percent: {{value: N}}, N from 0 to 100")
    if raw.get("provider") is not None:
        _parse_provider(f"{where}.provider", raw["provider"])
    return raw


def _parse_provider(where: str, raw: Any) -> None:
    """Only Zipkin, reporting to a service of the mesh (never an outside address)
    at a `collector_endpoint` path, in JSON (what mesh.apps.spans records)."""
    cfg = raw.get("typed_config") if isinstance(raw, dict) else None
    if not isinstance(cfg, dict) or "name" not in raw:
        raise _fail(where, "needs `name` and `typed_config` (Envoy's tracer form)")
    if cfg.get("@type") != ZIPKIN_TYPE:
        raise _fail(f"{where}.typed_config", f"{cfg.get('@type')!r}: only the Zipkin tracer "
                    f"({ZIPKIN_TYPE}), whose collector is a service of the mesh")
    if not isinstance(cfg.get("collector_cluster"), str):
        raise _fail(f"{where}.typed_config.collector_cluster",
                    "missing: the mesh service that collects the spans (e.g. mesh.apps.spans)")
    endpoint = cfg.get("collector_endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        raise _fail(f"{where}.typed_config.collector_endpoint",
                    f"{endpoint!r}: the collector's path is needed (e.g. /api/v2/spans); "
                    "Envoy refuses a Zipkin tracer without it")
    version = cfg.get("collector_endpoint_version", "HTTP_JSON")
    if version != "HTTP_JSON":
        raise _fail(f"{where}.typed_config.collector_endpoint_version",
                    f"{version!r}: only HTTP_JSON (or absent), the form mesh.apps.spans records")


def validate_references(spec: MeshSpec) -> None:
    """Every service named in `calls`, in an outbound route or as a Zipkin collector
    must exist; a policy's errors name the file and place it was written in."""
    where = str(spec.path)
    groups = spec.groups()
    for s in spec.services.values():
        if s.ports != groups[s.service][0].ports:
            raise _fail(f"{where}: services.{s.name}.ports",
                        f"{list(s.ports)} differ from the ports of service {s.service!r} "
                        f"({list(groups[s.service][0].ports)} in services.{groups[s.service][0].name})")
        for c in s.calls:
            if c not in groups:
                raise _fail(f"{where}: services.{s.name}.calls", f"unknown service {c!r}")
    for sname, pol in spec.policies.items():
        place = spec.policy_places.get(sname, f"{where}: services.{sname}.policy")
        if sname not in groups:
            raise _fail(place, f"policy for {sname!r}: unknown service")
        for side in POLICY_SIDES:
            for i, route in enumerate(pol[side]["routes"]):
                for ref_place, ref in route_cluster_refs(route):
                    if side == "inbound" and ref != "inbound":
                        raise _fail(f"{place}.inbound.routes[{i}].{ref_place}",
                                    f"{ref!r}: inbound routes may only name `inbound`")
                    if side == "outbound" and ref not in groups:
                        raise _fail(f"{place}.outbound.routes[{i}].{ref_place}",
                                    f"unknown service {ref!r}")
            collector = zipkin_collector(pol[side]["tracing"])
            if collector is not None and collector not in groups:
                raise _fail(f"{place}.{side}.tracing.provider.typed_config.collector_cluster",
                            f"unknown service {collector!r}")


def zipkin_collector(tracing: dict[str, Any] | None) -> str | None:
    """The service a side's Zipkin tracer reports to (None without one)."""
    return ((tracing or {}).get("provider") or {}).get("typed_config", {}).get("collector_cluster")
