"""A minimal ADS client (grpclib), for tests, the scale benchmark and debugging.

Not used by the server. `AdsClient` opens one stream (SotW or Delta), sends
requests and receives responses; `ack()` answers the last response of a type.
"""

from __future__ import annotations

import asyncio
from typing import Any as AnyT

import grpclib
import grpclib.const
import grpclib.exceptions
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.service.discovery.v3 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from grpclib.client import Channel

BASE = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"


class AdsClient:
    """One ADS stream. Use `async with AdsClient(host, port, node_id) as c:`."""

    def __init__(self, host: str, port: int, node_id: str, *, delta: bool = False,
                 cluster: str = "", channel: Channel | None = None) -> None:
        self.node = Node(id=node_id, cluster=cluster) if node_id else None
        self.delta = delta
        self._own_channel = channel is None
        self.channel = channel or Channel(host, port)
        self._cm: AnyT = None
        self.stream: AnyT = None
        self.last: dict[str, AnyT] = {}
        self._first = True

    async def __aenter__(self) -> AdsClient:
        if self.delta:
            self._cm = self.channel.request(BASE + "DeltaAggregatedResources",
                                            grpclib.const.Cardinality.STREAM_STREAM,
                                            DeltaDiscoveryRequest, DeltaDiscoveryResponse)
        else:
            self._cm = self.channel.request(BASE + "StreamAggregatedResources",
                                            grpclib.const.Cardinality.STREAM_STREAM,
                                            DiscoveryRequest, DiscoveryResponse)
        self.stream = await self._cm.__aenter__()
        return self

    async def __aexit__(self, *exc: AnyT) -> None:
        try:
            if self.stream is not None:
                await self.stream.cancel()
        except (grpclib.exceptions.StreamTerminatedError, grpclib.GRPCError, ConnectionError):
            pass  # the server already ended the stream
        finally:
            if self._own_channel:
                self.channel.close()

    async def send(self, type_url: str, names: list[str] | None = None, *, nonce: str = "",
                   version: str = "", error: AnyT = None, unsubscribe: list[str] | None = None,
                   initial: dict[str, str] | None = None) -> None:
        node = self.node if self._first else None
        self._first = False
        if self.delta:
            msg: AnyT = DeltaDiscoveryRequest(
                node=node, type_url=type_url, resource_names_subscribe=names or [],
                resource_names_unsubscribe=unsubscribe or [], response_nonce=nonce,
                error_detail=error, initial_resource_versions=initial or {})
        else:
            msg = DiscoveryRequest(node=node, type_url=type_url, resource_names=names or [],
                                   response_nonce=nonce, version_info=version, error_detail=error)
        await self.stream.send_message(msg)

    async def recv(self, timeout: float = 5.0) -> AnyT:
        """The next response (DiscoveryResponse or DeltaDiscoveryResponse); TimeoutError if none."""
        msg = await asyncio.wait_for(self.stream.recv_message(), timeout)
        if msg is not None:
            self.last[msg.type_url] = msg
        return msg

    async def ack(self, type_url: str, names: list[str] | None = None) -> None:
        last = self.last[type_url]
        if self.delta:
            await self.send(type_url, nonce=last.nonce)
        else:
            await self.send(type_url, names, nonce=last.nonce, version=last.version_info)
