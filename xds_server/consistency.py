"""Reference checks run before a snapshot is published (go-control-plane's Consistent()).

Called by xds_server.cache.SnapshotCache.set_snapshot. A snapshot where a
listener names an unknown route configuration or cluster, or a route names an
unknown cluster, is refused with errors that name the resource, the field and
the file it came from.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any as AnyT

import betterproto2

from xds_server import resources as res
from xds_server.snapshot import Entry, Snapshot


class InconsistentSnapshot(ValueError):
    """Raised by check(); `problems` lists one line per unresolved reference."""

    def __init__(self, problems: list[str], limit: int = 20) -> None:
        shown = problems[:limit]
        if len(problems) > limit:
            shown.append(f"... and {len(problems) - limit} more")
        super().__init__("; ".join(shown))
        self.problems = shown


def check(snap: Snapshot) -> None:
    """Raise InconsistentSnapshot if any reference does not resolve (memoized per snapshot)."""
    if "consistency" not in snap.memo:
        try:
            _check(snap)
            snap.memo["consistency"] = None
        except InconsistentSnapshot as exc:
            snap.memo["consistency"] = exc
    found = snap.memo["consistency"]
    if found is not None:
        raise found


def _check(snap: Snapshot) -> None:
    clusters = set(snap.of_type(res.CLUSTER))
    routes = set(snap.of_type(res.ROUTE))
    problems: list[str] = []
    for e in snap.of_type(res.LISTENER).values():
        for field, kind, name in listener_refs(e.message):
            if (kind == "route" and name not in routes) or (kind == "cluster" and name not in clusters):
                problems.append(_line(e, "listener", field, kind, name))
    for e in snap.of_type(res.ROUTE).values():
        for field, name in route_config_clusters(e.message):
            if name not in clusters:
                problems.append(_line(e, "route configuration", field, "cluster", name))
    if problems:
        raise InconsistentSnapshot(problems)


def _line(e: Entry, what: str, field: str, kind: str, name: str) -> str:
    where = f"{e.origin}: " if e.origin else ""
    config = "route configuration" if kind == "route" else kind
    return f"{where}{what} {e.name!r} {field}: unknown {config} {name!r}"


def _unpack(any_msg: betterproto2.Message | None) -> betterproto2.Message | None:
    if any_msg is None or not getattr(any_msg, "type_url", ""):
        return None
    try:
        return any_msg.unpack()  # type: ignore[attr-defined,no-any-return]
    except (TypeError, ValueError):  # opaque extension we cannot decode: nothing to check
        return None


def listener_refs(listener: AnyT) -> Iterator[tuple[str, str, str]]:
    """(field path, "route"|"cluster", name) for each reference of a Listener."""
    chains = [(f"filter_chains[{i}]", fc) for i, fc in enumerate(listener.filter_chains or [])]
    if getattr(listener, "default_filter_chain", None) is not None:
        chains.append(("default_filter_chain", listener.default_filter_chain))
    for path, fc in chains:
        for j, flt in enumerate(fc.filters or []):
            cfg = _unpack(flt.typed_config)
            if cfg is None:
                continue
            base = f"{path}.filters[{j}]"
            yield from _filter_refs(base, cfg)


def _filter_refs(base: str, cfg: AnyT) -> Iterator[tuple[str, str, str]]:
    if type(cfg).__name__ == "HttpConnectionManager":
        rds = getattr(cfg, "rds", None)
        if rds is not None and rds.route_config_name:
            yield f"{base}.rds.route_config_name", "route", rds.route_config_name
        inline = getattr(cfg, "route_config", None)
        if inline is not None:
            for field, name in route_config_clusters(inline):
                yield f"{base}.route_config.{field}", "cluster", name
    elif type(cfg).__name__ == "TcpProxy":
        if cfg.cluster:
            yield f"{base}.cluster", "cluster", cfg.cluster
        wc = getattr(cfg, "weighted_clusters", None)
        for k, c in enumerate(wc.clusters if wc is not None else []):
            yield f"{base}.weighted_clusters.clusters[{k}].name", "cluster", c.name


def route_config_clusters(rc: AnyT) -> Iterator[tuple[str, str]]:
    """(field path, cluster name) for each cluster a RouteConfiguration routes to."""
    for i, vh in enumerate(rc.virtual_hosts or []):
        for j, route in enumerate(vh.routes or []):
            action = getattr(route, "route", None)
            if action is None:
                continue
            base = f"virtual_hosts[{i}].routes[{j}].route"
            if action.cluster:
                yield f"{base}.cluster", action.cluster
            wc = getattr(action, "weighted_clusters", None)
            for k, c in enumerate(wc.clusters if wc is not None else []):
                yield f"{base}.weighted_clusters.clusters[{k}].name", c.name
            for k, m in enumerate(getattr(action, "request_mirror_policies", None) or []):
                if m.cluster:
                    yield f"{base}.request_mirror_policies[{k}].cluster", m.cluster
