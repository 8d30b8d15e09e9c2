"""What the SotW and Delta state machines share: events, outgoing messages, staging.

Staging is make-before-break: when a new snapshot removes resources the proxy
has, the stream first sends the new snapshot *plus* the removed resources
(every add and change, in CDS, EDS, LDS, RDS order), and only once the proxy
has answered all of it, the final snapshot without them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Generic, TypeVar

from xds_server import resources as res
from xds_server.protocol.wire import Encoded
from xds_server.snapshot import Snapshot


@dataclass(frozen=True)
class Ack:
    type_url: str
    version: str
    nonce: str
    born: float  # when the change this response carries was first seen (monotonic)


@dataclass(frozen=True)
class Nack:
    type_url: str
    version: str
    nonce: str
    error: str


@dataclass(frozen=True)
class Ignored:
    type_url: str
    reason: str


Event = Ack | Nack | Ignored


@dataclass(frozen=True)
class Outgoing:
    """A response to send: wire bytes plus what the debug pages report about it."""

    type_url: str
    version: str
    nonce: str
    message: Encoded
    count: int
    removed: tuple[str, ...] = ()


def error_text(status: object, limit: int = 2000) -> str:
    """A NACK's error_detail as one printable line, whatever the proxy put in it."""
    msg = getattr(status, "message", "")
    code = getattr(status, "code", 0)
    text = msg if isinstance(msg, str) else repr(msg)
    text = "".join(ch if ch.isprintable() else " " for ch in text)[:limit]
    return f"{text} (code {code})" if code else text or "(empty error_detail)"


# Types whose resources name clusters: sent only once the proxy answered the
# current CDS, so a route never points at a cluster the proxy does not have yet.
# (EDS and SDS are not held: Envoy needs them to warm the new clusters and
# listeners before it answers.)
WAIT_FOR_CLUSTERS = frozenset({
    "type.googleapis.com/envoy.config.listener.v3.Listener",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
})


class Staging:
    """Chooses the view a stream sends now: the target, or target + kept removals."""

    def __init__(self) -> None:
        self.target: Snapshot = Snapshot.empty()
        self.born: float = 0.0
        self.base: Snapshot | None = None
        self._base_is_mid_of: Snapshot | None = None
        self._sent_unsettled = False

    def set_target(self, snap: Snapshot, born: float) -> None:
        if snap is not self.target:
            if self._sent_unsettled:
                # The proxy may hold anything of the view being delivered: keep all of it
                # until the new target's adds are answered.
                self.base, self._base_is_mid_of = self.view(), None
            self.target = snap
            self.born = born

    def mark_sent(self) -> None:
        """Called by the stream for every response it sends."""
        self._sent_unsettled = True

    def view(self) -> Snapshot:
        t = self.target
        base = self.base
        if base is None or base is t or self._base_is_mid_of is t or not t.removes_from(base):
            return t
        return t.with_kept(base)

    def settled(self, view: Snapshot) -> None:
        """Called when everything of `view` is sent and answered."""
        if view is not self.target:
            self._base_is_mid_of = self.target
        self.base = view
        self._sent_unsettled = False


@dataclass
class AnswerState:
    """Per type URL, both protocols: the last response sent and how it was answered."""

    nonce: str = ""
    pending: bool = False
    sent_version: str = ""
    sent_born: float = 0.0
    sent_at: float = 0.0
    acked_version: str = ""
    acked_at: float = 0.0
    nacked_version: str = ""
    last_error: str = ""
    sends: int = 0
    acks: int = 0
    nacks: int = 0

    def answer(self, type_url: str, req: object, acked_version: str) -> Event:
        """The proxy answered the pending response: a NACK (error_detail set) or an ACK."""
        self.pending = False
        err = getattr(req, "error_detail", None)
        if err is not None:
            self.nacked_version = self.sent_version
            self.last_error = error_text(err)
            self.nacks += 1
            return Nack(type_url, self.sent_version, self.nonce, self.last_error)
        self.acked_version, self.acked_at = acked_version, time.monotonic()
        self.acks += 1
        return Ack(type_url, acked_version, self.nonce, self.sent_born)


S = TypeVar("S", bound=AnswerState)


class StreamCore(Generic[S]):
    """What SotwStream and DeltaStream share: per-type state, staging, served types,
    push order, and when a type's response is due (`responses`); each says
    what its response is (`_response`) and when the proxy has it all."""

    def __init__(self, served_types: frozenset[str] = res.CORE_TYPES) -> None:
        self.types: dict[str, S] = {}
        self.staging = Staging()
        self._served = served_types
        self._counter = 0

    def set_snapshot(self, snap: Snapshot, born: float | None = None) -> None:
        self.staging.set_target(snap, time.monotonic() if born is None else born)

    def _ordered(self) -> list[str]:
        """Subscribed types in make-before-break order, then other types by name."""
        known = [t for t in res.PUSH_ORDER if t in self.types]
        return known + sorted(t for t in self.types if t not in res.CORE_TYPES)

    def _servable(self, type_url: str, view: Snapshot) -> bool:
        return type_url in self._served or type_url in view.entries

    def _subscribed(self, type_url: str, st: S, watching: bool) -> list[Event]:
        """After a request applied its subscription to `st`: `watching` False
        (no name, no wildcard left) means nothing is in flight for the type
        any more, as Envoy does not ACK responses of a type it no longer
        watches; an Ignored event when nothing of `type_url` is served."""
        if not watching:
            st.pending = False
        if type_url in self._served or type_url in self.staging.target.entries:
            return []
        return [Ignored(type_url, "type not served (no such resources)")]

    def responses(self) -> list[Outgoing]:
        """Responses due now, in make-before-break order; marks them sent.
        A type waits while its last response is unanswered and, for
        WAIT_FOR_CLUSTERS, until the proxy answered the current clusters.
        With nothing to send and everything answered, the view is settled
        (the next staged one, without the removed resources, may follow)."""
        view = self.staging.view()
        out: list[Outgoing] = []
        for type_url in self._ordered():
            st = self.types[type_url]
            if st.pending or not self._servable(type_url, view):
                continue
            if type_url in WAIT_FOR_CLUSTERS and not self._clusters_settled(view):
                continue
            msg = self._response(type_url, st, view)
            if msg is not None:
                out.append(msg)
        if not out and self._all_answered(view):
            self.staging.settled(view)
            if self.staging.view() is not view:
                return self.responses()
        return out

    def _clusters_settled(self, view: Snapshot) -> bool:
        cds = self.types.get(res.CLUSTER)
        return cds is None or (not cds.pending and self._has_version(cds, view.version(res.CLUSTER)))

    # ---- what each protocol says itself ----------------------------------
    def _response(self, type_url: str, st: S, view: Snapshot) -> Outgoing | None:
        """The response of `type_url` due now (marked sent), None when none is."""
        raise NotImplementedError

    def _all_answered(self, view: Snapshot) -> bool:
        """Nothing of `view` is unanswered or left to send: it may settle."""
        raise NotImplementedError

    def _has_version(self, st: S, version: str) -> bool:
        """`st`'s last response carried `version` of its type (the proxy's once answered)."""
        raise NotImplementedError
