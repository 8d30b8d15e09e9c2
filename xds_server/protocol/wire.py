"""Encode-once wire forms of xDS responses.

Serialization is the costly part of a push. The resources part of a response
is encoded once per (snapshot version, type, names) and shared by every stream;
each stream only appends its own nonce (protobuf fields may come in any
order, and a parser takes the last value of a scalar field).
"""

from __future__ import annotations

from dataclasses import dataclass


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, bytes, sub-messages)."""
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def s(field: int, text: str) -> bytes:
    return ld(field, text.encode()) if text else b""


def any_bytes(type_url: str, value: bytes) -> bytes:
    """google.protobuf.Any: type_url = 1, value = 2."""
    return s(1, type_url) + (ld(2, value) if value else b"")


def sotw_body(version: str, type_url: str, items: list[tuple[str, bytes]]) -> bytes:
    """DiscoveryResponse without nonce: version_info 1, resources 2, type_url 4."""
    parts = [s(1, version)]
    parts.extend(ld(2, any_bytes(t, v)) for t, v in items)
    parts.append(s(4, type_url))
    return b"".join(parts)


def delta_resource(name: str, version: str, type_url: str, value: bytes) -> bytes:
    """One `resources` entry of DeltaDiscoveryResponse (Resource: version 1, resource 2, name 3)."""
    return ld(2, s(1, version) + ld(2, any_bytes(type_url, value)) + s(3, name))


def delta_tail(version: str, type_url: str, removed: list[str]) -> bytes:
    """system_version_info 1, type_url 4, removed_resources 6."""
    return s(1, version) + s(4, type_url) + b"".join(s(6, n) for n in removed)


@dataclass(frozen=True)
class Encoded:
    """A response already in wire form; the server's codec sends `data` as is."""

    data: bytes

    def SerializeToString(self) -> bytes:  # noqa: N802 - grpclib's codec calls this name
        return self.data


def with_nonce(body: bytes, nonce: str) -> Encoded:
    """Append the nonce (field 5 in both response kinds)."""
    return Encoded(body + s(5, nonce))
