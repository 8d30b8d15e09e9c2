"""The fast request decoder agrees with betterproto2 and never crashes on garbage."""

from __future__ import annotations

from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.service.discovery.v3 import DeltaDiscoveryRequest, DiscoveryRequest
from envoy_data_plane.google.rpc import Status
from hypothesis import given, settings
from hypothesis import strategies as st

from xds_server.protocol.common import error_text
from xds_server.protocol.requests import DecodeError, decode_delta, decode_sotw

text = st.text(max_size=40)
names = st.lists(text, max_size=5)
status = st.none() | st.builds(Status, code=st.integers(0, 16), message=text)
node = st.none() | st.builds(Node, id=text.filter(bool), cluster=text)


@settings(max_examples=150, deadline=None)
@given(version=text, names=names, type_url=text, nonce=text, error=status, node=node)
def test_sotw_matches_betterproto(version, names, type_url, nonce, error, node):
    msg = DiscoveryRequest(version_info=version, resource_names=names, type_url=type_url,
                           response_nonce=nonce, error_detail=error, node=node)
    got = decode_sotw(bytes(msg))
    assert (got.version_info, got.resource_names, got.type_url, got.response_nonce) == \
           (version, names, type_url, nonce)
    assert (got.error_detail is None) == (error is None)
    if error is not None:
        assert (got.error_detail.code, got.error_detail.message) == (error.code, error.message)
    if node is not None:
        assert got.node.id == node.id and got.node.cluster == node.cluster


@settings(max_examples=150, deadline=None)
@given(sub=names, unsub=names, initial=st.dictionaries(text, text, max_size=4), type_url=text, nonce=text,
       error=status)
def test_delta_matches_betterproto(sub, unsub, initial, type_url, nonce, error):
    msg = DeltaDiscoveryRequest(resource_names_subscribe=sub, resource_names_unsubscribe=unsub,
                                initial_resource_versions=initial, type_url=type_url,
                                response_nonce=nonce, error_detail=error)
    got = decode_delta(bytes(msg))
    assert (got.resource_names_subscribe, got.resource_names_unsubscribe, got.type_url,
            got.response_nonce) == (sub, unsub, type_url, nonce)
    assert got.initial_resource_versions == initial


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_is_a_decode_error_or_a_request(data):
    for decode in (decode_sotw, decode_delta):
        try:
            decode(data)
        except DecodeError:
            pass


def test_garbage_error_detail_is_still_a_nack():
    raw = bytes(DiscoveryRequest(type_url="t", response_nonce="1"))
    raw += b"\x32\x03\xff\xff\xff"  # field 6 (error_detail) with undecodable bytes
    got = decode_sotw(raw)
    assert got.error_detail is not None  # a NACK, whatever its detail says
    assert error_text(got.error_detail) in ("(empty error_detail)", "(undecodable error_detail)")
