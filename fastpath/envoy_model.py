"""Envoy resources <-> proto-JSON dicts, for the split's classifier and residual.

Called by `fastpath.split`, `fastpath.residual` and `fastpath.inputs`; owned by
`fastpath`. The classifier works on the canonical proto-JSON form of a resource
(`Message.to_dict()`: camelCase keys, typed Any payloads unpacked with "@type"),
because that form is the same whether the resource came from a YAML file in
snake_case, from xDS bytes, or from the Istio importer.

betterproto2 can only (un)pack an Any whose payload type was imported; types are
imported on demand from the type URL (``envoy.x.y.v3.Name`` lives in module
``envoy_data_plane.envoy.x.y.v3``).
"""

from __future__ import annotations

import importlib
import json
import re
from collections import OrderedDict
from typing import Any

from xds_server import protojson

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

_CLASSES = {
    LISTENER: ("envoy_data_plane.envoy.config.listener.v3", "Listener"),
    ROUTE: ("envoy_data_plane.envoy.config.route.v3", "RouteConfiguration"),
    CLUSTER: ("envoy_data_plane.envoy.config.cluster.v3", "Cluster"),
    ENDPOINT: ("envoy_data_plane.envoy.config.endpoint.v3", "ClusterLoadAssignment"),
    SECRET: ("envoy_data_plane.envoy.extensions.transport_sockets.tls.v3", "Secret"),
}
ENVOY_REJECTS = protojson.ENVOY_REJECTS  # in a ResourceError: Envoy would reject it too
_UNREGISTERED = re.compile(r"unregistered type: (?:[^/\s]*/)?([\w.]+)")


class ResourceError(ValueError):
    """A resource that cannot be parsed; the message names the bad input."""


def type_name(type_url: str) -> str:
    """``type.googleapis.com/a.b.C`` -> ``a.b.C``."""
    return type_url.rsplit("/", 1)[-1]


def import_type(name: str) -> bool:
    """Import the module that defines proto type ``name``; False if unknown."""
    module = "envoy_data_plane." + name.rsplit(".", 1)[0]
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _import_all_types(obj: Any) -> None:
    if isinstance(obj, dict):
        t = obj.get("@type")
        if isinstance(t, str):
            import_type(type_name(t))
        for v in obj.values():
            _import_all_types(v)
    elif isinstance(obj, list):
        for v in obj:
            _import_all_types(v)


def message_class(type_url: str) -> type | None:
    """The betterproto2 class of one of the five xDS resource types, or None."""
    spec = _CLASSES.get(type_url)
    if spec is None:
        return None
    return getattr(importlib.import_module(spec[0]), spec[1])  # type: ignore[no-any-return]


def parse(type_url: str, data: dict[str, Any]) -> Any:
    """Build the message of ``type_url`` from a YAML/JSON dict (snake or camel case)."""
    return parse_with_notes(type_url, data)[0]


def parse_with_notes(type_url: str, data: dict[str, Any]) -> tuple[Any, list[protojson.Opaque]]:
    """`parse`, and the extension payloads kept opaque for Envoy (types or fields
    L7FP's proto library lacks, `xds_server.protojson`)."""
    cls = message_class(type_url)
    if cls is None:
        raise ResourceError(f"unsupported resource type {type_url}")
    if not isinstance(data, dict):
        raise ResourceError(f"{type_name(type_url)}: expected a mapping, got {type(data).__name__}")
    body = {k: v for k, v in data.items() if k != "@type"}
    _import_all_types(body)
    try:
        return cls.from_dict(body), []  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - betterproto2/pydantic raise many kinds; read as Envoy does
        pass
    protojson.register_typed_struct()
    try:
        body, opaque = protojson.prepare(cls, body)
        return cls.from_dict(body), opaque  # type: ignore[attr-defined]
    except Exception as e:  # noqa: BLE001 - ProtoJsonError names the field
        raise ResourceError(f"{type_name(type_url)} {resource_label(data)}: {_short(e)}") from e


def resource_label(data: dict[str, Any]) -> str:
    """How an error names a resource: its name, else (a listener) its address."""
    name = data.get("name", data.get("cluster_name", data.get("clusterName")))
    if isinstance(name, str) and name:
        return repr(name)
    sa = data.get("address", {})
    sa = sa.get("socket_address", sa.get("socketAddress")) if isinstance(sa, dict) else None
    if isinstance(sa, dict):
        port = sa.get("port_value", sa.get("portValue", "?"))
        return f"(no name) at {sa.get('address', '?')}:{port}"
    return "(no name)"


_JSON_CACHE: OrderedDict[tuple[str, bytes], str] = OrderedDict()
_JSON_CACHE_SIZE = 4096


def to_json(msg: Any, raw: bytes | None = None) -> dict[str, Any]:
    """Canonical proto-JSON dict of ``msg`` (a fresh copy the caller may change).

    betterproto2's to_dict is slow (pydantic validation and type hints per
    message), and a node's snapshot mostly repeats the previous one, so results
    are cached by the message's wire bytes (``raw``, if the caller has them).
    """
    key = (type(msg).__name__, raw if raw is not None else bytes(msg))
    hit = _JSON_CACHE.get(key)
    if hit is None:
        hit = json.dumps(_to_dict(msg))
        _JSON_CACHE[key] = hit
        if len(_JSON_CACHE) > _JSON_CACHE_SIZE:
            _JSON_CACHE.popitem(last=False)
    else:
        _JSON_CACHE.move_to_end(key)
    return json.loads(hit)  # type: ignore[no-any-return]


def _to_dict(msg: Any) -> dict[str, Any]:
    for _ in range(64):
        try:
            return msg.to_dict()  # type: ignore[no-any-return]
        except TypeError as e:
            m = _UNREGISTERED.search(str(e))
            if not m or not import_type(m.group(1)):
                raise ResourceError(f"cannot decode {getattr(msg, 'name', '?')!r}: {e}") from e
    raise ResourceError(f"cannot decode {getattr(msg, 'name', '?')!r}: too many payload types")


def from_json(type_url: str, data: dict[str, Any]) -> Any:
    """Inverse of `to_json` (used by the residual)."""
    return parse(type_url, data)


def unwrapped(v: Any) -> Any:
    """A field that is a wrapper in proto-JSON (BoolValue: {"value": x}, an empty
    one false) or a plain value, as its value."""
    return v.get("value", False) if isinstance(v, dict) else v


def bool_field(d: dict[str, Any], key: str, default: bool) -> bool:
    """A bool or BoolValue field of a proto-JSON dict (`default` when absent)."""
    return bool(unwrapped(d.get(key, default)))


def duration_ms(value: str | None) -> int | None:
    """Proto-JSON duration ("1.5s") -> milliseconds; None stays None."""
    if value is None:
        return None
    if not value.endswith("s"):
        raise ResourceError(f"bad duration {value!r}")
    return round(float(value[:-1]) * 1000)


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:400] if text else type(e).__name__
