"""State of one DeltaAggregatedResources (incremental) stream, sans-I/O.

Owned by one server stream task (xds_server.server); same feeding as SotwStream.
Rules it keeps:

* the server tracks, per type, the version of every resource the proxy has
  (`known`), seeded from `initial_resource_versions` on the first request, so
  a reconnecting proxy gets only what changed and no spurious removals;
* subscribe/unsubscribe (names, `*`) apply on every request; an empty first
  request is a legacy wildcard subscription;
* ACK/NACK match a pending nonce; any other nonce is stale (its subscription
  changes still apply, as the protocol requires);
* `known` is updated when a response is sent, so a NACKed resource version is
  not re-sent until it changes;
* at most one unanswered response per type, LDS/RDS wait for the proxy's answer
  to the current CDS, and removals come after the adds they make room for (see
  protocol.common.Staging); a type with no subscription left blocks nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from xds_server.protocol import wire
from xds_server.protocol.common import (
    AnswerState,
    Event,
    Ignored,
    Outgoing,
    StreamCore,
)
from xds_server.snapshot import Entry, Snapshot


@dataclass
class DeltaTypeState(AnswerState):
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    known: dict[str, str] = field(default_factory=dict)
    requested: bool = False
    first_sent: bool = False
    synced_version: str = ""
    dirty: bool = True  # a request changed the subscription since the last send


class DeltaStream(StreamCore[DeltaTypeState]):
    """One Delta ADS stream's protocol state (see module docstring for the rules)."""

    kind = "delta"

    def receive(self, req: object) -> list[Event]:
        """Apply one DeltaDiscoveryRequest."""
        type_url = getattr(req, "type_url", "")
        if not type_url:
            return [Ignored("", "request without type_url")]
        st = self.types.setdefault(type_url, DeltaTypeState())
        events: list[Event] = []
        nonce = req.response_nonce  # type: ignore[attr-defined]
        if nonce and st.pending and nonce == st.nonce:
            events.append(st.answer(type_url, req, st.sent_version))
        elif nonce and nonce != st.nonce and st.nonce:
            events.append(Ignored(type_url, f"stale nonce {nonce!r} (last sent {st.nonce!r})"))
        self._subscribe(st, req)
        return events + self._subscribed(type_url, st, st.wildcard or bool(st.names))

    @staticmethod
    def _subscribe(st: DeltaTypeState, req: object) -> None:
        sub = list(req.resource_names_subscribe)  # type: ignore[attr-defined]
        unsub = list(req.resource_names_unsubscribe)  # type: ignore[attr-defined]
        if not st.requested:
            st.requested = True
            st.known = dict(req.initial_resource_versions)  # type: ignore[attr-defined]
            if not sub:
                st.wildcard = True
        if sub or unsub:
            st.dirty = True
        for n in sub:
            if n == "*":
                st.wildcard = True
            else:
                st.names.add(n)
        for n in unsub:
            if n == "*":
                st.wildcard = False
            else:
                st.names.discard(n)
                if not st.wildcard:
                    st.known.pop(n, None)  # the proxy drops it; re-subscribing re-sends it

    def _has_version(self, st: DeltaTypeState, version: str) -> bool:
        return st.synced_version == version

    def _all_answered(self, view: Snapshot) -> bool:
        return not any(st.pending for st in self.types.values())

    def _response(self, type_url: str, st: DeltaTypeState, view: Snapshot) -> Outgoing | None:
        entries = view.of_type(type_url)
        wanted = entries.keys() if st.wildcard else st.names & entries.keys()
        updates = [entries[n] for n in sorted(wanted) if st.known.get(n) != entries[n].version]
        relevant = (lambda n: True) if st.wildcard else (lambda n: n in st.names)
        removed = sorted(n for n in st.known if n not in entries and relevant(n))
        st.dirty = False
        st.synced_version = view.version(type_url)  # what the proxy has once this is answered
        if not updates and not removed and st.first_sent:
            return None
        for e in updates:
            st.known[e.name] = e.version
        for n in removed:
            del st.known[n]
        return self._send(type_url, st, view, updates, removed)

    def _send(
        self, type_url: str, st: DeltaTypeState, view: Snapshot, updates: list[Entry], removed: list[str]
    ) -> Outgoing:
        self._counter += 1
        st.nonce = str(self._counter)
        st.sent_version = view.version(type_url)
        st.sent_born, st.sent_at = self.staging.born, time.monotonic()
        st.pending, st.first_sent = True, True
        st.sends += 1
        self.staging.mark_sent()
        body = b"".join(_encoded_resource(view, e) for e in updates)
        body += wire.delta_tail(st.sent_version, type_url, removed)
        msg = wire.with_nonce(body, st.nonce)
        return Outgoing(type_url, st.sent_version, st.nonce, msg, len(updates), tuple(removed))


def _encoded_resource(view: Snapshot, e: Entry) -> bytes:
    """A Resource entry, encoded once per snapshot and shared by all delta streams."""
    key = ("delta", e.type_url, e.name)
    hit = view.memo.get(key)
    if hit is None or hit[0] is not e:
        hit = (e, wire.delta_resource(e.name, e.version, e.type_url, e.value))
        view.memo[key] = hit
    return hit[1]  # type: ignore[no-any-return]
