"""Mistakes a user makes in an Envoy file, said in one line as Envoy 1.40 would say them.

Called by `fastpath.inputs` (the readers of `l7fp split`); owned by the split. Pure
functions over the raw YAML dicts (snake_case or camelCase keys, as written), so the
line names the input as the user wrote it. What Envoy does was seen with the real
binary (`envoy --mode validate -c FILE`, and a running Envoy for duplicate names):

* a tab in the indentation: yaml-cpp "illegal tab when looking for indentation";
* a listener without `filter_chains` (and no default chain): "error adding listener
  'ADDRESS': no filter chains specified" (the file is rejected);
* a filter chain without filters: accepted (its connections are closed);
* two static listeners with one name: accepted, only the first one listens;
* a route of a bootstrap's inline route_config naming an undefined cluster: "route:
  unknown cluster 'NAME'" (the file is rejected; `validate_clusters: false` allows it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from xds_server import protojson, yaml_errors

ENVOY_REJECTS = protojson.ENVOY_REJECTS


field = protojson.field  # obj[snake] or its camelCase spelling
untyped_filters = protojson.untyped_filters
yaml_problem = yaml_errors.problem  # one line: where, and what


def address(lis: Any) -> str:
    """A listener's ``address:port`` as Envoy names an unnamed listener in errors."""
    sa = field(field(lis, "address"), "socket_address")
    if not isinstance(sa, dict):
        return "?"
    return f"{sa.get('address', '?')}:{field(sa, 'port_value') or 0}"


def label(lis: Any) -> str:
    name = field(lis, "name")
    return f"listener {name!r}" if isinstance(name, str) and name else f"listener at {address(lis)}"


def bootstrap_problems(boot: dict[str, Any]) -> list[str]:
    """What Envoy rejects in a bootstrap outside ``static_resources`` (those are read
    resource by resource): an ``Any`` without @type, a misspelt or v2 @type, ...
    (`xds_server.protojson`); a field L7FP's library lacks is not Envoy's error."""
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

    rest = {k: v for k, v in boot.items() if k not in ("static_resources", "staticResources")}
    protojson.register_typed_struct()
    try:
        protojson.prepare(Bootstrap, rest)
    except protojson.ProtoJsonError as e:
        return [f"bootstrap {e}"] if ENVOY_REJECTS in e.problem else []
    return []


def listener_problems(items: list[Any]) -> tuple[list[int], list[tuple[int, str]], list[str]]:
    """For the raw listeners of one document: (indexes to leave out, (index, line) of what
    makes Envoy reject a listener and the file, notes). Left out: later listeners of a
    name already seen, listeners Envoy rejects."""
    drop: list[int] = []
    rejects: list[tuple[int, str]] = []
    notes: list[str] = []
    first: dict[str, str] = {}
    for i, lis in enumerate(items):
        if not isinstance(lis, dict):
            continue
        name = field(lis, "name")
        if isinstance(name, str) and name in first:
            drop.append(i)
            notes.append(f"{label(lis)} at {address(lis)}: duplicate name: Envoy 1.40 serves only the "
                         f"first listener {name!r} ({first[name]}); this one is ignored")
            continue
        if isinstance(name, str):
            first[name] = address(lis)
        chains = field(lis, "filter_chains")
        if not chains and not field(lis, "default_filter_chain"):
            drop.append(i)
            rejects.append((i, f"{label(lis)}: no filter_chains: {ENVOY_REJECTS} (\"error adding "
                               f"listener '{address(lis)}': no filter chains specified\")"))
            continue
        for j, chain in enumerate(chains if isinstance(chains, list) else [chains]):
            if not field(chain, "filters"):
                notes.append(f"{label(lis)}: filter_chains[{j}] has no filters: Envoy accepts it and "
                             "closes those connections; nothing to split")
        untyped = [(i, f"{label(lis)}: {where}: {why}")
                   for where, why in [*untyped_filters(lis), *filter_order(lis)]]
        if untyped:
            drop.append(i)
            rejects += untyped
    return drop, rejects, notes


TERMINAL = ("router", "upstream_codec")  # Envoy's terminal HTTP filters (the chain's last)


def filter_order(lis: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(field, Envoy's error) for an HTTP filter chain whose terminal filter is not last:
    Envoy 1.40 rejects a router before another filter, and a last filter that is not
    terminal. A last filter of a type L7FP does not know is not judged."""
    from fastpath.classify_route import filter_kind

    chains = field(lis, "filter_chains") or []
    for j, chain in enumerate(chains if isinstance(chains, list) else [chains]):
        filters = field(chain, "filters") or []
        for k, f in enumerate(filters if isinstance(filters, list) else [filters]):
            hfs = field(field(f, "typed_config"), "http_filters")
            if not isinstance(hfs, list) or not hfs or not all(isinstance(h, dict) for h in hfs):
                continue
            where = f"filter_chains[{j}].filters[{k}].typed_config.http_filters"
            kinds = [filter_kind({"name": h.get("name"), "typedConfig": field(h, "typed_config")})
                     for h in hfs]
            for m, (h, kind) in enumerate(zip(hfs, kinds, strict=True)):
                if kind in TERMINAL and m < len(hfs) - 1:
                    yield f"{where}[{m}]", (f"{ENVOY_REJECTS} (\"Error: terminal filter named {h.get('name')} "
                                            "... must be the last filter in a http filter chain.\")")
            last = hfs[-1]
            if kinds[-1] not in TERMINAL and _known_type(field(last, "typed_config")):
                yield f"{where}[{len(hfs) - 1}]", (
                    f"{ENVOY_REJECTS} (\"Error: non-terminal filter named {last.get('name')} ... is the "
                    "last filter in a http filter chain.\")")


def _known_type(tc: Any) -> bool:
    """A typed_config of a type the proto library has (so surely not a terminal one L7FP
    does not know)."""
    url = tc.get("@type") if isinstance(tc, dict) else None
    return isinstance(url, str) and url not in protojson.TYPED_STRUCT_URLS \
        and protojson.resolve(url) is not None


def unknown_clusters(listeners: list[Any], clusters: list[Any]) -> list[str]:
    """Lines for routes of inline route configs that name a cluster the bootstrap lacks."""
    known = {field(c, "name") for c in clusters if isinstance(c, dict)}
    out = []
    for lis in listeners:
        for rc in _inline_route_configs(lis):
            if field(rc, "validate_clusters") is False:
                continue
            first: dict[str, str] = {}  # unknown name -> what Envoy says of its first use
            for vh in protojson.repeated(field(rc, "virtual_hosts")):
                for r in protojson.repeated(field(vh, "routes")):
                    for place, name in protojson.route_cluster_refs(r):
                        if name not in known:
                            first.setdefault(name, _ENVOY_SAYS[place.split(".")[1].split("[")[0]])
            for name, says in first.items():
                out.append(f"{label(lis)}: route config {field(rc, 'name') or ''!r}: unknown cluster "
                           f"{name!r}: {ENVOY_REJECTS} (\"{says} '{name}'\")")
    return out


# Envoy 1.40's rejection of a static route naming an unknown cluster, by where
# the name is (measured with `envoy --mode validate`).
_ENVOY_SAYS = {"cluster": "route: unknown cluster",
               "weighted_clusters": "route: unknown weighted cluster",
               "request_mirror_policies": "route: unknown shadow cluster"}



def _inline_route_configs(lis: Any) -> Iterator[dict[str, Any]]:
    chains = field(lis, "filter_chains") or []
    for chain in chains if isinstance(chains, list) else [chains]:
        filters = field(chain, "filters") or []
        for f in filters if isinstance(filters, list) else [filters]:
            rc = field(field(f, "typed_config"), "route_config")
            if isinstance(rc, dict):
                yield rc
