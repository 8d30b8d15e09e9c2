"""State of one StreamAggregatedResources (state of the world) stream, sans-I/O.

Owned by one server stream task (xds_server.server). Feed it requests with
`receive()`, snapshots with `set_snapshot()`, and send what `responses()`
returns. Rules it keeps:

* a request whose `response_nonce` is not the last nonce sent for its type is
  stale: it ACKs/NACKs nothing, but its names are kept (they are the proxy's
  latest interest); a fresh stream has no nonce yet, so nothing is stale there;
* LDS and RDS wait until the proxy answered the current CDS (no route to a
  cluster the proxy lacks); a type with no subscription gets nothing and
  blocks nothing (Envoy does not ACK types it no longer watches);
* at most one unanswered response per type: the next waits for the ACK/NACK,
  which keeps CDS → EDS → LDS → RDS ordering meaningful;
* a NACKed version is never re-sent: only a new version or a new set of
  subscribed names produces a new response;
* wildcard: `*` in resource_names, or an empty first request (legacy wildcard,
  which stays wildcard while later requests are empty too).
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
from xds_server.snapshot import Snapshot


@dataclass
class TypeState(AnswerState):
    """Per type URL: subscription and what was sent and answered."""

    wildcard: bool = False
    legacy_wildcard: bool = False
    names: frozenset[str] = frozenset()
    requested: bool = False
    sent_key: tuple[str, bool, frozenset[str]] | None = None
    extra: dict[str, object] = field(default_factory=dict)


class SotwStream(StreamCore[TypeState]):
    """One SotW ADS stream's protocol state (see module docstring for the rules)."""

    kind = "sotw"

    def receive(self, req: object) -> list[Event]:
        """Apply one DiscoveryRequest; returns what it meant (ACK, NACK, ignored)."""
        type_url = getattr(req, "type_url", "")
        if not type_url:
            return [Ignored("", "request without type_url")]
        st = self.types.setdefault(type_url, TypeState())
        nonce = req.response_nonce  # type: ignore[attr-defined]
        events: list[Event] = []
        if st.nonce and nonce != st.nonce:
            # Not an answer. Its names are still the proxy's latest interest (requests
            # arrive in order), and Envoy does not repeat them: keep them.
            events.append(Ignored(type_url, f"stale nonce {nonce!r} (last sent {st.nonce!r})"))
        elif st.nonce and st.pending:
            events.append(st.answer(type_url, req, req.version_info))  # type: ignore[attr-defined]
        self._subscribe(st, list(req.resource_names))  # type: ignore[attr-defined]
        return events + self._subscribed(type_url, st, st.wildcard or bool(st.names))

    @staticmethod
    def _subscribe(st: TypeState, names: list[str]) -> None:
        first = not st.requested
        st.requested = True
        if "*" in names:
            st.wildcard, st.legacy_wildcard = True, False
        elif not names and (first or st.legacy_wildcard):
            st.wildcard = st.legacy_wildcard = True
        else:
            st.wildcard = st.legacy_wildcard = False
        st.names = frozenset(n for n in names if n != "*")

    def _response(self, type_url: str, st: TypeState, view: Snapshot) -> Outgoing | None:
        if not st.wildcard and not st.names:
            return None  # nothing subscribed: no response expected
        key = (view.version(type_url), st.wildcard, st.names)
        if key == st.sent_key:
            return None
        return self._send(type_url, st, view, key)

    def _has_version(self, st: TypeState, version: str) -> bool:
        return st.sent_key is not None and st.sent_key[0] == version

    def _all_answered(self, view: Snapshot) -> bool:
        for type_url, st in self.types.items():
            if not self._servable(type_url, view) or not (st.wildcard or st.names):
                continue
            if st.pending or st.sent_key is None or st.sent_key[0] != view.version(type_url):
                return False
        return True

    def _send(self, type_url: str, st: TypeState, view: Snapshot, key: tuple) -> Outgoing:
        body, count = sotw_body(view, type_url, st.wildcard, st.names)
        self._counter += 1
        st.nonce = str(self._counter)
        st.sent_key, st.sent_version = key, key[0]
        st.sent_born, st.sent_at = self.staging.born, time.monotonic()
        st.pending = True
        st.sends += 1
        self.staging.mark_sent()
        return Outgoing(type_url, key[0], st.nonce, wire.with_nonce(body, st.nonce), count)


def sotw_body(view: Snapshot, type_url: str, wildcard: bool, names: frozenset[str]) -> tuple[bytes, int]:
    """Encoded DiscoveryResponse minus nonce, memoized on the snapshot (encode once)."""
    key = ("sotw", type_url, True if wildcard else names)
    hit = view.memo.get(key)
    if hit is None:
        entries = view.of_type(type_url)
        chosen = list(entries.values()) if wildcard else [entries[n] for n in sorted(names) if n in entries]
        body = wire.sotw_body(view.version(type_url), type_url, [(type_url, e.value) for e in chosen])
        hit = (body, len(chosen))
        view.memo[key] = hit
    return hit  # type: ignore[no-any-return]
