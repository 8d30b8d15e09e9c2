"""Sans-I/O client side of one upstream SotW ADS stream (the relay's view of istiod).

Owned by `xds_server.relay.UpstreamSession`, which feeds it upstream
responses and the sidecar's verdicts, and sends the requests it returns.
It tracks, per type URL: the subscription (CDS/LDS wildcard; EDS/RDS names
taken from the clusters and listeners received), the resources of the last
response, and the upstream (version, nonce) waiting for the sidecar's
ACK/NACK, which is passed upstream as the sidecar gave it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import betterproto2

from xds_server import resources as res

WILDCARD = (res.CLUSTER, res.LISTENER)
NAMED = {res.ENDPOINT: res.CLUSTER, res.ROUTE: res.LISTENER}  # type -> type whose resources name it


@dataclass
class Request:
    """A DiscoveryRequest to send (the session adds the node on the first one)."""

    type_url: str
    version: str = ""
    nonce: str = ""
    names: tuple[str, ...] = ()
    error: str = ""


@dataclass
class TypeState:
    names: tuple[str, ...] = ()
    subscribed: bool = False
    acked_version: str = ""
    pending: tuple[str, str] | None = None  # (version, nonce) awaiting the sidecar's verdict
    resources: dict[str, betterproto2.Message] = field(default_factory=dict)


class UpstreamState:
    """Per-type subscription and ACK bookkeeping of one relayed sidecar."""

    def __init__(self) -> None:
        self.types: dict[str, TypeState] = {t: TypeState() for t in res.PUSH_ORDER if t != res.SECRET}
        self.generation = 0  # bumped whenever the resources change

    def start(self) -> list[Request]:
        """First requests on a (re)connected stream: wildcard CDS and LDS, names kept."""
        out = []
        for t, st in self.types.items():
            if t in WILDCARD or st.names:
                st.subscribed = True
                out.append(Request(t, st.acked_version, "", st.names))
        return out

    def receive(self, type_url: str, version: str, nonce: str,
                items: list[tuple[str, bytes]]) -> list[Request]:
        """An upstream response. Returns new subscriptions it implies (EDS/RDS names).

        Resources that do not decode are NACKed upstream at once (the sidecar
        never sees them); otherwise the response waits for the sidecar's verdict.
        """
        st = self.types.get(type_url)
        if st is None:
            return [Request(type_url, "", nonce, (), f"type {type_url} is not relayed")]
        try:
            decoded = dict(_decode(type_url, items))
        except (KeyError, ValueError, TypeError) as exc:
            return [Request(type_url, st.acked_version, nonce, st.names, f"relay cannot decode: {exc}")]
        st.resources = decoded
        st.pending = (version, nonce)
        self.generation += 1
        return list(self._follow(type_url))

    def _follow(self, type_url: str) -> Iterator[Request]:
        for child, parent in NAMED.items():
            if parent != type_url:
                continue
            names = tuple(sorted(_referenced(child, self.types[parent].resources.values())))
            st = self.types[child]
            if names != st.names or not st.subscribed:
                st.names, st.subscribed = names, True
                # Empty nonce: a subscription change, not an ACK of a pending response.
                yield Request(child, st.acked_version, "", names)

    def verdict(self, type_url: str, error: str | None) -> Request | None:
        """The sidecar ACKed (error None) or NACKed the config derived from the pending response."""
        st = self.types[type_url]
        if st.pending is None:
            return None
        version, nonce = st.pending
        st.pending = None
        if error is None:
            st.acked_version = version
            return Request(type_url, version, nonce, st.names)
        return Request(type_url, st.acked_version, nonce, st.names, error)

    def resources(self) -> dict[str, list[betterproto2.Message]]:
        return {t: list(st.resources.values()) for t, st in self.types.items() if st.resources}


def _decode(type_url: str, items: list[tuple[str, bytes]]) -> Iterator[tuple[str, betterproto2.Message]]:
    cls = res.message_class(type_url)
    for url, value in items:
        if url != type_url:
            raise ValueError(f"resource of type {url} in a {type_url} response")
        msg = cls.FromString(value)  # type: ignore[attr-defined]
        yield res.resource_name(msg), msg


def _referenced(type_url: str, parents: Any) -> set[str]:
    """EDS names of EDS clusters, or RDS names of listeners' HTTP connection managers."""
    out: set[str] = set()
    for msg in parents:
        if type_url == res.ENDPOINT:
            if int(getattr(msg, "type", 0) or 0) == 3:  # Cluster.DiscoveryType.EDS
                cfg = getattr(msg, "eds_cluster_config", None)
                out.add((cfg.service_name if cfg and cfg.service_name else "") or msg.name)
        else:
            _walk_rds(msg.to_dict(), out)
    return out


def _walk_rds(d: Any, out: set[str]) -> None:
    if isinstance(d, dict):
        rds = d.get("rds")
        if isinstance(rds, dict) and rds.get("routeConfigName"):
            out.add(str(rds["routeConfigName"]))
        for v in d.values():
            _walk_rds(v, out)
    elif isinstance(d, list):
        for v in d:
            _walk_rds(v, out)
