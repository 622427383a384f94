"""The gRPC services: Linkerd's ``Destination`` plus TrustMesh's policy and trust-bundle streams.

Every stream follows the same rules: the current answer is sent as soon as one exists, then
every change; a malformed request ends with INVALID_ARGUMENT, an unknown service or workload
with NOT_FOUND, and :func:`status_for` is the one place where errors become status codes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from destination.endpoints import resolve_endpoints
from destination.errors import (
    DestinationError,
    InvalidResource,
    InvalidTarget,
    NotFound,
    SourceError,
    Unavailable,
)
from destination.hub import Hub, Topic
from destination.inbound import opaque_ports, resolve_inbound
from destination.metrics import ServiceMetrics
from destination.model import EndpointSet, diff
from destination.outbound import resolve_outbound
from destination.paths import parse_authority, parse_workload_ref
from destination.policy import Protocol
from destination.resources import ClusterState, MeshSettings
from destination.wire import bundle_to_proto, inbound_to_proto, outbound_to_proto, update_to_proto
from protos import destination_pb2 as dpb
from protos import policy_pb2 as ppb
from protos import policy_pb2_grpc as pgrpc

log = logging.getLogger(__name__)

_STATUS: tuple[tuple[type[DestinationError], grpc.StatusCode], ...] = (
    (InvalidTarget, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidResource, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (SourceError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: DestinationError) -> grpc.StatusCode:
    """The gRPC status code of a destination error."""
    for cls, code in _STATUS:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _encode_diff(old: EndpointSet | None, new: EndpointSet) -> tuple[bytes, ...]:
    # Serialized once per (from, to) version pair and shared by every stream at ``old``.
    return tuple(update_to_proto(c).SerializeToString() for c in diff(old, new))


def _as_error(value: object) -> DestinationError:
    if isinstance(value, DestinationError):
        return value
    return Unavailable("the destination service has no answer for this request")


async def _abort(context: grpc.aio.ServicerContext, error: DestinationError) -> None:
    await context.abort(status_for(error), str(error))


class _Streams:
    """Shared subscription plumbing: counting, releasing, catching up to the newest value."""

    def __init__(self, hub: Hub, settings: MeshSettings, metrics: ServiceMetrics) -> None:
        self.hub = hub
        self.settings = settings
        self.metrics = metrics

    async def values(
        self,
        stream: str,
        topic: Topic[Any],
        context: grpc.aio.ServicerContext,
        encode: Callable[[Any], Any],
    ) -> AsyncIterator[Any]:
        """Yield the encoded current value of ``topic``, then every new one."""
        gauge = self.metrics.subscribers.labels(stream)
        sent = self.metrics.updates.labels(stream)
        gauge.inc()
        self.metrics.topics.set(self.hub.topic_count())
        try:
            version = 0
            while True:
                await topic.wait_newer(version)
                version, value = topic.version, topic.value
                if isinstance(value, DestinationError):
                    await _abort(context, value)
                yield topic.cached(None, functools.partial(encode, value))
                sent.inc()
        finally:
            gauge.dec()
            self.hub.release(topic)
            self.metrics.topics.set(self.hub.topic_count())


class DestinationService:
    """``io.linkerd.proxy.destination.Destination``."""

    def __init__(self, streams: _Streams) -> None:
        self._s = streams

    async def Get(
        self, request: dpb.GetDestination, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Yields encoded ``Update`` messages (see :func:`add_services` for the serializer)."""
        s = self._s
        try:
            target = parse_authority(request.path, s.settings.cluster_domain)
            parse_workload_ref(request.context_token)
        except InvalidTarget as e:
            await _abort(context, e)
            return
        settings = s.settings
        topic = s.hub.subscribe(
            "endpoints", target, lambda state: resolve_endpoints(state, settings, target)
        )
        gauge = s.metrics.subscribers.labels("destination")
        counter = s.metrics.updates.labels("destination")
        gauge.inc()
        s.metrics.topics.set(s.hub.topic_count())
        try:
            last: EndpointSet | None = None
            last_version = version = 0
            while True:
                await topic.wait_newer(version)
                version, value = topic.version, topic.value
                if not isinstance(value, EndpointSet):
                    await _abort(context, _as_error(value))
                    return
                if last is None and not value.exists:
                    await _abort(context, NotFound(f"service {target.authority} does not exist"))
                # Everyone who last saw ``last_version`` gets the same diff: encode it once.
                updates = topic.cached(last_version, functools.partial(_encode_diff, last, value))
                for update in updates:
                    yield update
                counter.inc(len(updates))
                last, last_version = value, version
        finally:
            gauge.dec()
            s.hub.release(topic)
            s.metrics.topics.set(s.hub.topic_count())

    async def GetProfile(
        self, request: dpb.GetDestination, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dpb.DestinationProfile]:
        s = self._s
        try:
            target = parse_authority(request.path, s.settings.cluster_domain)
        except InvalidTarget as e:
            await _abort(context, e)
            return
        settings = s.settings

        def resolve(state: ClusterState) -> dpb.DestinationProfile:
            try:
                policy = resolve_outbound(state, settings, target)
            except NotFound:
                return dpb.DestinationProfile()  # unknown names get an empty profile
            opaque = policy.protocol is Protocol.OPAQUE
            host = target.authority.rsplit(":", 1)[0]
            profile = dpb.DestinationProfile(fully_qualified_name=host, opaque_protocol=opaque)
            profile.retry_budget.retry_ratio = 0.2
            profile.retry_budget.min_retries_per_second = 10
            profile.retry_budget.ttl.FromSeconds(10)
            profile.protocol = (
                dpb.DestinationProfile.OPAQUE if opaque else dpb.DestinationProfile.DETECT
            )
            return profile

        topic = s.hub.subscribe("profile", target, resolve)
        async for msg in s.values("profile", topic, context, lambda p: p):
            yield msg


class InboundPolicyService(pgrpc.InboundPoliciesServicer):
    def __init__(self, streams: _Streams) -> None:
        self._s = streams

    async def Watch(
        self, request: ppb.PortSpec, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ppb.InboundPolicy]:
        s = self._s
        try:
            ref = parse_workload_ref(request.workload)
            if ref.namespace is None or ref.name is None:
                raise InvalidTarget("the workload must name both a namespace and a workload")
            if not 1 <= request.port <= 65535:
                raise InvalidTarget(f"port {request.port} is outside 1..65535")
        except InvalidTarget as e:
            await _abort(context, e)
            return
        settings, ns, name, port = s.settings, ref.namespace, ref.name, request.port
        topic = s.hub.subscribe(
            "inbound", (ns, name, port), lambda st: resolve_inbound(st, settings, ns, name, port)
        )
        async for msg in s.values("inbound", topic, context, inbound_to_proto):
            yield msg


class OutboundPolicyService(pgrpc.OutboundPoliciesServicer):
    def __init__(self, streams: _Streams) -> None:
        self._s = streams

    async def Watch(
        self, request: ppb.TrafficSpec, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ppb.OutboundPolicy]:
        s = self._s
        try:
            target = parse_authority(request.authority, s.settings.cluster_domain)
            parse_workload_ref(request.source_workload)
        except InvalidTarget as e:
            await _abort(context, e)
            return
        settings = s.settings
        topic = s.hub.subscribe(
            "outbound", target, lambda st: resolve_outbound(st, settings, target)
        )
        async for msg in s.values("outbound", topic, context, outbound_to_proto):
            yield msg


class TrustBundleService(pgrpc.TrustBundlesServicer):
    def __init__(self, streams: _Streams) -> None:
        self._s = streams

    async def Watch(
        self, request: ppb.TrustBundleRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ppb.TrustBundle]:
        topic = self._s.hub.bundle_topic()
        async for msg in self._s.values("trust_bundle", topic, context, bundle_to_proto):
            yield msg


def add_services(
    server: grpc.aio.Server, hub: Hub, settings: MeshSettings, metrics: ServiceMetrics
) -> None:
    """Register every destination-service API on ``server``."""
    streams = _Streams(hub, settings, metrics)
    dst = DestinationService(streams)
    # Get yields pre-encoded bytes, so its serializer is the identity; the service name and
    # method paths are Linkerd's.
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "io.linkerd.proxy.destination.Destination",
                {
                    "Get": grpc.unary_stream_rpc_method_handler(
                        dst.Get,
                        request_deserializer=dpb.GetDestination.FromString,
                        response_serializer=bytes,
                    ),
                    "GetProfile": grpc.unary_stream_rpc_method_handler(
                        dst.GetProfile,
                        request_deserializer=dpb.GetDestination.FromString,
                        response_serializer=dpb.DestinationProfile.SerializeToString,
                    ),
                },
            ),
        )
    )
    pgrpc.add_InboundPoliciesServicer_to_server(InboundPolicyService(streams), server)
    pgrpc.add_OutboundPoliciesServicer_to_server(OutboundPolicyService(streams), server)
    pgrpc.add_TrustBundlesServicer_to_server(TrustBundleService(streams), server)


__all__ = ["add_services", "opaque_ports", "status_for"]
