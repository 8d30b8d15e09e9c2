"""Immutable per-node snapshots with content-hash versions and encode-once caches.

Owned by xds_server.cache (which publishes them) and read by the protocol
state machines. A Snapshot holds, per type URL, the resources by name, each
encoded exactly once; versions are content hashes, so two snapshots with the
same content have the same versions and a no-op reload pushes nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any as AnyT

import betterproto2

from xds_server import resources as res


@dataclass(frozen=True)
class Entry:
    """One resource: its message, its encoded bytes (once) and content version."""

    name: str
    type_url: str
    message: betterproto2.Message
    value: bytes
    version: str
    origin: str = ""

    @classmethod
    def of(cls, msg: betterproto2.Message, type_url: str, origin: str = "") -> Entry:
        """Encode `msg` (once: messages are treated as immutable, so the Entry is cached)."""
        key = (id(msg), type_url, origin)
        hit = _ENCODED.get(key)
        if hit is not None and hit.message is msg:
            return hit
        value = bytes(msg)
        version = hashlib.blake2b(value, digest_size=8).hexdigest()
        e = cls(res.resource_name(msg), type_url, msg, value, version, origin)
        if len(_ENCODED) >= _ENCODED_MAX:
            _ENCODED.clear()
        _ENCODED[key] = e  # holds msg, so its id cannot be reused while cached
        return e


_ENCODED: dict[tuple[int, str, str], Entry] = {}
_ENCODED_MAX = 50_000


def _type_version(entries: Mapping[str, Entry]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(entries):
        h.update(name.encode())
        h.update(b"\0")
        h.update(entries[name].version.encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass(eq=False)
class Snapshot:
    """Resources of one node, by type URL then name. Treat as immutable.

    `memo` caches derived encodings (responses per name set) so every stream
    that sends the same (version, type, names) shares one encoding.
    """

    entries: dict[str, dict[str, Entry]]
    versions: dict[str, str]
    memo: dict[AnyT, AnyT] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, by_type: Mapping[str, Iterable[Entry]]) -> Snapshot:
        entries: dict[str, dict[str, Entry]] = {}
        for type_url, items in by_type.items():
            entries[type_url] = {e.name: e for e in items}
        versions = {t: _type_version(e) for t, e in entries.items()}
        return cls(entries, versions)

    @classmethod
    def from_messages(
        cls, by_type: Mapping[str, Iterable[betterproto2.Message]],
        origins: Mapping[tuple[str, str], str] | None = None,
    ) -> Snapshot:
        origins = origins or {}
        built: dict[str, list[Entry]] = {}
        for type_url, msgs in by_type.items():
            items = []
            for m in msgs:
                name = res.resource_name(m)
                items.append(Entry.of(m, type_url, origins.get((type_url, name), "")))
            built[type_url] = items
        return cls.build(built)

    @classmethod
    def empty(cls) -> Snapshot:
        return cls({}, {})

    def version(self, type_url: str) -> str:
        """Content version of one type; the empty type has a fixed version."""
        v = self.versions.get(type_url)
        if v is None:
            v = _type_version({})
        return v

    def of_type(self, type_url: str) -> dict[str, Entry]:
        return self.entries.get(type_url, {})

    def types(self) -> list[str]:
        """Type URLs in make-before-break order, then the opaque ones sorted."""
        known = [t for t in res.PUSH_ORDER if t in self.entries]
        return known + sorted(t for t in self.entries if t not in res.CORE_TYPES)

    def messages(self) -> dict[str, list[betterproto2.Message]]:
        return {t: [e.message for e in d.values()] for t, d in self.entries.items()}

    def with_kept(self, old: Snapshot) -> Snapshot:
        """This snapshot plus the resources of `old` it removes (make-before-break step 1).

        Memoized per `old`, so every stream moving from old to self shares it.
        """
        key = ("kept", id(old))
        hit = self.memo.get(key)
        if hit is not None and hit[0] is old:
            return hit[1]  # type: ignore[no-any-return]
        merged: dict[str, list[Entry]] = {}
        for t in set(self.entries) | set(old.entries):
            mine = self.of_type(t)
            kept = [e for n, e in old.of_type(t).items() if n not in mine]
            merged[t] = list(mine.values()) + kept
        snap = Snapshot.build(merged)
        self.memo[key] = (old, snap)
        return snap

    def removes_from(self, old: Snapshot) -> bool:
        """True when some resource of `old` is absent here."""
        for t, d in old.entries.items():
            mine = self.of_type(t)
            if any(n not in mine for n in d):
                return True
        return False

    def summary(self) -> dict[str, dict[str, AnyT]]:
        return {
            res.SHORT_NAMES.get(t, t): {"version": self.versions[t], "names": sorted(d)}
            for t, d in self.entries.items()
        }
