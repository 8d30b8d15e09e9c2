"""What the SotW and Delta state machines share: events, outgoing messages, staging.

Staging is make-before-break: when a new snapshot removes resources the proxy
has, the stream first sends the new snapshot *plus* the removed resources
(every add and change, in CDS, EDS, LDS, RDS order), and only once the proxy
has answered all of it, the final snapshot without them.
"""

from __future__ import annotations

from dataclasses import dataclass

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
