"""Envoy resource types: type URLs, the extension registry, parsing and naming.

Owned by xds_server. Every module that parses or encodes Envoy resources calls
`ensure_registered()` first: betterproto2 resolves `@type` in `Any` fields
through its message pool, which only knows the modules already imported.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any as AnyT

import betterproto2

from xds_server import protojson

log = logging.getLogger(__name__)

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

# Make-before-break push order: what is referenced goes before what refers to it.
PUSH_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)
CORE_TYPES = frozenset(PUSH_ORDER)
SHORT_NAMES = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds", SECRET: "sds"}

HCM_URL = (
    "type.googleapis.com/envoy.extensions.filters.network."
    "http_connection_manager.v3.HttpConnectionManager"
)
TCP_PROXY_URL = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"

# Modules whose messages appear inside `typed_config` of common Envoy configs
# (Istio's sidecar configs included). Imported once so `@type` resolves.
_EXTENSION_MODULES = [
    "config.listener.v3", "config.route.v3", "config.cluster.v3", "config.endpoint.v3",
    "config.core.v3", "config.rbac.v3", "config.accesslog.v3",
    "extensions.transport_sockets.tls.v3", "extensions.transport_sockets.raw_buffer.v3",
    "extensions.transport_sockets.tcp_stats.v3", "extensions.transport_sockets.proxy_protocol.v3",
    "extensions.filters.network.http_connection_manager.v3",
    "extensions.filters.network.tcp_proxy.v3", "extensions.filters.network.rbac.v3",
    "extensions.filters.network.local_ratelimit.v3", "extensions.filters.network.direct_response.v3",
    "extensions.filters.network.connection_limit.v3",
    "extensions.filters.http.router.v3", "extensions.filters.http.rbac.v3",
    "extensions.filters.http.local_ratelimit.v3", "extensions.filters.http.fault.v3",
    "extensions.filters.http.cors.v3", "extensions.filters.http.lua.v3",
    "extensions.filters.http.header_mutation.v3", "extensions.filters.http.grpc_stats.v3",
    "extensions.filters.http.grpc_web.v3", "extensions.filters.http.ext_authz.v3",
    "extensions.filters.http.jwt_authn.v3", "extensions.filters.http.compressor.v3",
    "extensions.filters.http.buffer.v3", "extensions.filters.http.health_check.v3",
    "extensions.filters.http.wasm.v3", "extensions.filters.http.set_metadata.v3",
    "extensions.filters.http.header_to_metadata.v3", "extensions.filters.http.ratelimit.v3",
    "extensions.filters.listener.tls_inspector.v3",
    "extensions.filters.listener.http_inspector.v3",
    "extensions.filters.listener.original_dst.v3",
    "extensions.access_loggers.file.v3", "extensions.access_loggers.stream.v3",
    "extensions.upstreams.http.v3", "extensions.compression.gzip.compressor.v3",
    "extensions.load_balancing_policies.round_robin.v3",
    "extensions.load_balancing_policies.least_request.v3",
    "extensions.load_balancing_policies.ring_hash.v3",
    "extensions.load_balancing_policies.maglev.v3",
    "extensions.load_balancing_policies.random.v3",
    "extensions.load_balancing_policies.cluster_provided.v3",
    "extensions.load_balancing_policies.client_side_weighted_round_robin.v3",
    "extensions.clusters.aggregate.v3", "extensions.clusters.dynamic_forward_proxy.v3",
    "extensions.request_id.uuid.v3", "extensions.path.match.uri_template.v3",
    "extensions.retry.host.previous_hosts.v3",  # Istio's default retry policy (route files)
    "extensions.path.rewrite.uri_template.v3", "extensions.matching.common_inputs.network.v3",
    "extensions.matching.input_matchers.ip.v3", "extensions.stat_sinks.metrics_service.v3",
    "type.v3", "type.matcher.v3",
]
_registered = False


def ensure_registered() -> None:
    """Import the Envoy extension modules once (idempotent, cheap after the first call)."""
    global _registered
    if _registered:
        return
    with warnings.catch_warnings():  # generated code trips pydantic deprecations on import
        warnings.simplefilter("ignore", DeprecationWarning)
        for mod in _EXTENSION_MODULES:
            try:
                importlib.import_module(f"envoy_data_plane.envoy.{mod}")
            except ImportError:  # a module this envoy-data-plane release does not ship
                log.debug("extension module %s not available", mod)
    importlib.import_module("envoy_data_plane.google.protobuf")
    importlib.import_module("envoy_data_plane.google.rpc")
    _speed_up_validation()
    protojson.register_typed_struct()
    _registered = True


def _speed_up_validation() -> None:
    """Two betterproto2 0.9 hot spots, same results, several times faster.

    Validators are cached per message class (same checks, ~5x faster encoding).

    betterproto2 0.9 re-validates every message on `bytes(msg)` and builds a new
    `SchemaValidator` from the class schema for each one; building it dominates
    the encode time of a large RouteConfiguration (3 s for 1,000 routes).
    """
    import pydantic_core

    if getattr(betterproto2.Message, "_l7fp_fast_validate", False):
        return

    def _validate(self: betterproto2.Message) -> None:
        cls = type(self)
        validator = cls.__dict__.get("_l7fp_validator")
        if validator is None:
            validator = pydantic_core.SchemaValidator(cls.__pydantic_core_schema__)  # type: ignore[attr-defined]
            cls._l7fp_validator = validator  # type: ignore[attr-defined]
        d = self.__dict__.copy()
        d.pop("_unknown_fields", None)
        validator.validate_python(d)

    def _get_field_default(self: betterproto2.Message, field_name: str) -> AnyT:
        # The original wraps this in warnings.catch_warnings() on every call (tens of
        # thousands per large message): half the parse/encode time. Default
        # generators of deprecated fields are plain factories that do not warn.
        return self._betterproto.default_gen[field_name]()  # type: ignore[arg-type]

    betterproto2.Message._validate = _validate  # type: ignore[method-assign]
    betterproto2.Message._get_field_default = _get_field_default  # type: ignore[method-assign]
    betterproto2.Message._l7fp_fast_validate = True  # type: ignore[attr-defined]


def pool() -> betterproto2.MessagePool:
    from envoy_data_plane.message_pool import default_message_pool

    ensure_registered()
    return default_message_pool


def message_class(type_url: str) -> type[betterproto2.Message]:
    """The betterproto2 class of `type_url`; KeyError naming the URL if unknown."""
    try:
        return pool().url_to_type[type_url]
    except KeyError:
        raise KeyError(f"unknown @type {type_url!r}") from None


def type_url_of(msg: betterproto2.Message) -> str:
    return pool().type_to_url[type(msg)]


def resource_name(msg: betterproto2.Message) -> str:
    """The xDS name of a resource: `cluster_name` for EDS, `name` for the rest."""
    name = getattr(msg, "cluster_name", None) if hasattr(msg, "cluster_name") else None
    if name is None:
        name = getattr(msg, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{type(msg).__name__} has no name")
    return name


class ResourceError(ValueError):
    """A resource that does not parse; `field` is a dotted path inside the resource."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def parse_resource(d: AnyT, where: str = "") -> betterproto2.Message:
    """Parse one `@type`-tagged dict (Envoy JSON/YAML form) into a message.

    Raises ResourceError naming the field (`resources[3].bogus`) and the problem.
    Called by the config sources and the REST API.
    """
    if not isinstance(d, dict):
        raise ResourceError(where or "resource", f"expected a mapping, got {type(d).__name__}")
    body = dict(d)
    type_url = body.pop("@type", None)
    if not isinstance(type_url, str):
        raise ResourceError(f"{where}.@type", "missing @type")
    try:
        cls = message_class(type_url)
    except KeyError as exc:
        raise ResourceError(f"{where}.@type", str(exc.args[0])) from None
    try:
        msg = cls.from_dict(body)
    except Exception:  # noqa: BLE001 - betterproto2 raises KeyError/TypeError/AttributeError/...
        msg = _parse_as_envoy(cls, body, where)
    if type_url == LISTENER:  # a valid proto Envoy 1.40 still rejects: say it before Envoy NACKs
        for path, problem in protojson.untyped_filters(body):
            raise ResourceError(f"{where}.{path}" if where else path, problem)
    try:
        resource_name(msg)
    except ValueError:
        raise ResourceError(f"{where}.name", "missing name (cluster_name for endpoints)") from None
    return msg


def _parse_as_envoy(cls: type[betterproto2.Message], body: dict[str, AnyT], where: str
                    ) -> betterproto2.Message:
    """What betterproto2 refused, read as Envoy reads it (`xds_server.protojson`):
    one value for a list, lower-case enums, extension payloads the library lacks
    kept opaque (logged) for Envoy; else ResourceError naming the field."""
    try:
        prepared, opaque = protojson.prepare(cls, body)
    except protojson.ProtoJsonError as exc:
        raise ResourceError(".".join(p for p in (where, exc.path) if p), exc.problem) from None
    try:
        msg = cls.from_dict(prepared)
    except KeyError as exc:
        raise ResourceError(where, str(exc.args[0]) if exc.args else "unknown field") from None
    except Exception as exc:  # noqa: BLE001 - one line naming the resource, never a traceback
        raise ResourceError(where, _short_error(exc)) from None
    for o in opaque:
        log.info("%s.%s", where, o)
    return msg


def _short_error(exc: Exception) -> str:
    """One line from a pydantic or betterproto2 error (pydantic's are multi-line)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            return f"{loc}: {first.get('msg')}" if loc else str(first.get("msg"))
        except Exception:  # noqa: BLE001 - fall back to the plain text
            pass
    return " ".join(str(exc).split())[:300]


def to_dict(msg: betterproto2.Message) -> dict[str, AnyT]:
    """Envoy JSON form (camelCase, `@type` on Any) for config dumps."""
    d = msg.to_dict()
    return {"@type": type_url_of(msg), **d}
