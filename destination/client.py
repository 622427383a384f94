"""The proxy's side of the destination service: subscriptions with last-known-state semantics.

``DestinationClient`` opens one gRPC channel and, per question, a :class:`Watch`: a background
stream that keeps an immutable snapshot (an :class:`EndpointSet`, an :class:`InboundPolicy`, an
:class:`OutboundPolicy`, a :class:`TrustBundleSnapshot`). When the service goes away the watch
keeps its last snapshot, marks itself ``stale`` (and the client's ``control_plane_up`` gauge
drops to 0), and reconnects with jittered exponential backoff; the first message of the new
stream replaces the old state. ``INVALID_ARGUMENT`` is terminal (asking again cannot help);
``NOT_FOUND`` is an answer (the service may appear later) and is retried.

Given a ``trust_bundle`` provider instead of fixed roots, the channel verifies the
service against the proxy's current bundle: when the bundle's digest changes (an anchor
rotation), the client builds a new channel for new streams and, once that channel connects (or
after ``handover_grace`` seconds at most), closes the old one; the watches still on it
resubscribe on the new channel at once, keeping their last-known snapshots and without being
flagged stale (a planned handover is not the control plane going away; a failure of the new
stream is). A channel built on an outdated bundle is thus never kept for long, and a
working one is not dropped before its successor can connect.

    async with DestinationClient(
        "127.0.0.1:8086", channels=proxy.rpc.Channel, workload=WorkloadRef("default", "web-0")
    ) as c:
        watch = c.resolve("web.default.svc.cluster.local:8080")
        endpoints = await watch.wait_ready(timeout=5)
        async for snapshot in watch.updates():
            ...
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from destination.decode import (
    INBOUND_POLICY,
    OUTBOUND_POLICY,
    TRUST_BUNDLE,
    UPDATE,
    bundle_from_proto,
    inbound_from_proto,
    outbound_from_proto,
    update_from_proto,
)
from destination.errors import DestinationError, InvalidTarget, NotFound, Unavailable
from destination.model import EndpointSet, NoEndpoints, apply
from destination.paths import WorkloadRef
from destination.policy import InboundPolicy, OutboundPolicy, Protocol, Ref
from pki.bundle import TrustBundle
from protos import lite
from protos.rpc import Channel, ChannelFactory, RpcError, StatusCode

log = logging.getLogger(__name__)

V = TypeVar("V")

GET = "/io.linkerd.proxy.destination.Destination/Get"
INBOUND_WATCH = "/trustmesh.policy.v1.InboundPolicies/Watch"
OUTBOUND_WATCH = "/trustmesh.policy.v1.OutboundPolicies/Watch"
BUNDLES_WATCH = "/trustmesh.policy.v1.TrustBundles/Watch"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full-range jitter: ``base * 2**attempt`` capped at ``maximum``,
    then scaled by a random factor in ``[1 - jitter, 1]``."""

    base: float = 0.1
    maximum: float = 5.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.maximum:
            raise ValueError("backoff base must be positive and at most the maximum")
        if not 0 <= self.jitter <= 1:
            raise ValueError("backoff jitter must be within 0..1")

    def delay(self, attempt: int, rng: random.Random) -> float:
        raw = min(self.maximum, self.base * (2 ** min(attempt, 30)))
        return raw * (1 - self.jitter * rng.random())


class ClientMetrics:
    """What the client counts, in plain numbers; the proxy renders them
    (``trustmesh_destination_client_*``, :mod:`proxy.control`)."""

    def __init__(self) -> None:
        self.up = 1  # 0 while any watch serves its last-known state
        self.stale = 0  # watches serving their last-known state
        self.reconnects: collections.Counter[str] = collections.Counter()  # by stream kind
        self.updates: collections.Counter[str] = collections.Counter()  # by stream kind
        self.channel_rebuilds = 0  # channels rebuilt because the trust bundle changed


class Watch(Generic[V]):
    """The last-known answer to one question, kept current by a background stream."""

    def __init__(
        self,
        client: DestinationClient,
        kind: str,
        method: str,
        request: bytes,
        decode: Callable[[bytes], Any],
        fold: Callable[[V | None, Any], V],
        reset: Callable[[], V | None],
        on_not_found: Callable[[], V] | None = None,
    ) -> None:
        self.kind = kind
        self.current: V | None = None
        self.stale = True  # until the first message arrives
        self.error: DestinationError | None = None  # the last error (terminal when .done)
        self.done = False
        self._client = client
        self._method = method
        self._request = request
        self._decode = decode
        self._fold = fold
        self._reset = reset
        self._on_not_found = on_not_found
        self._changed = asyncio.Event()
        self._version = 0
        self._task = asyncio.ensure_future(self._run())

    def _set(self, value: V | None, *, stale: bool) -> None:
        changed = value != self.current or stale != self.stale
        self.current = value
        self._set_stale(stale)
        if changed:
            self._version += 1
            event, self._changed = self._changed, asyncio.Event()
            event.set()

    def _set_stale(self, stale: bool) -> None:
        if stale != self.stale:
            self.stale = stale
            self._client._stale_changed()

    async def _run(self) -> None:
        attempt = 0
        rng = self._client.rng
        handed_over = False  # the last stream ended because the client retired its channel
        while not self.done:
            channel = self._client._channel()
            call = channel.stream(self._method, self._request)
            try:
                value = self._reset()
                async for raw in call:
                    msg = self._decode(raw)
                    self._client.metrics.updates[self.kind] += 1
                    attempt = 0
                    handed_over = False
                    self.error = None
                    value = self._fold(value, msg)
                    self._set(value, stale=False)
                self.error = Unavailable("the destination service closed the stream")
            except RpcError as e:
                if e.code is StatusCode.INVALID_ARGUMENT:
                    self.error = InvalidTarget(e.details or "invalid request")
                    self.done = True
                    self._set(self.current, stale=True)
                    return
                if e.code is StatusCode.NOT_FOUND:
                    self.error = NotFound(e.details or "not found")
                    if self._on_not_found is not None:
                        self._set(self._on_not_found(), stale=False)
                elif channel.closed and not self.done:
                    # The client closed the channel under this stream (its trust bundle
                    # changed), so resubscribe on the current channel.
                    self.error = Unavailable("the channel was replaced after a trust-bundle change")
                    if not handed_over:
                        # A planned handover, not the control plane going away: the successor
                        # channel has connected (or the grace ran out), so resubscribe at once
                        # and keep serving the last-known state without flagging it stale. If
                        # the new stream fails, that failure flags it; a second handover in a
                        # row before any message takes the ordinary path below.
                        handed_over = True
                        self._client.metrics.reconnects[self.kind] += 1
                        continue
                else:
                    self.error = Unavailable(f"{e.code.name}: {e.details}")
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception as e:  # an update this client cannot read (a newer or buggy server)
                # Left to escape, it would end this task silently: the watch would keep its
                # last value, unflagged, and never hear another update (a revocation included).
                call.cancel()
                log.error("a %s update cannot be read; resubscribing: %s", self.kind, e)
                self.error = Unavailable(f"an update could not be read: {e}")
            if not isinstance(self.error, NotFound) or self._on_not_found is None:
                self._set(self.current, stale=True)  # keep the last-known value, flag it
            self._client.metrics.reconnects[self.kind] += 1
            await asyncio.sleep(self._client.backoff.delay(attempt, rng))
            attempt += 1

    async def wait_ready(self, timeout: float) -> V:
        """The first answer (raises the stream's error if it is terminal or on timeout)."""
        async with asyncio.timeout(timeout):
            while self.current is None:
                if self.done and self.error is not None:
                    raise self.error
                await self._changed.wait()
        return self.current

    async def updates(self) -> AsyncIterator[V]:
        """Yield the current snapshot (once known), then each new one, until closed."""
        version = -1
        while not self.done:
            if self._version != version and self.current is not None:
                version = self._version
                yield self.current
            else:
                await self._changed.wait()

    async def close(self) -> None:
        self.done = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        event, self._changed = self._changed, asyncio.Event()
        event.set()


class DestinationClient:
    """A connection to the destination service shared by every watch of one proxy.

    ``channels`` opens the gRPC channels (:class:`protos.rpc.ChannelFactory`; the proxy's is
    :class:`proxy.rpc.Channel`). With ``server_name`` the service is reached over TLS, verified
    for that name against ``roots_pem`` (fixed for the client's life) or ``trust_bundle`` (a
    provider, re-read every ``bundle_check_interval`` seconds and before every stream opens,
    which makes the channel follow the bundle in use). Without: plaintext.
    """

    def __init__(
        self,
        target: str,
        *,
        channels: ChannelFactory,
        workload: WorkloadRef | None = None,
        roots_pem: bytes | None = None,
        trust_bundle: Callable[[], TrustBundle] | None = None,
        server_name: str | None = None,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        metrics: ClientMetrics | None = None,
        bundle_check_interval: float = 1.0,
        handover_grace: float = 30.0,
    ) -> None:
        if roots_pem is not None and trust_bundle is not None:
            raise ValueError(
                "give the destination client fixed roots or a trust-bundle provider, not both"
            )
        if server_name is not None and roots_pem is None and trust_bundle is None:
            raise ValueError(f"TLS to {server_name} needs roots_pem or a trust-bundle provider")
        if bundle_check_interval <= 0 or handover_grace <= 0:
            raise ValueError("bundle_check_interval and handover_grace must be positive")
        self._channels = channels
        self.server_name = server_name
        self.target = target
        self.workload = workload or WorkloadRef()
        self.backoff = backoff or Backoff()
        self.rng = rng or random.Random()
        self.metrics = metrics or ClientMetrics()
        self.bundle_check_interval = bundle_check_interval
        self.handover_grace = handover_grace
        self._roots = roots_pem
        self._trust_bundle = trust_bundle
        # The digest the current channel verifies the service against (None: fixed or plain).
        self.trust_bundle_digest: str | None = None
        self._retired: list[Channel] = []
        self._handover: asyncio.Task[None] | None = None
        self._handover_deadline: float | None = None
        self._closing: set[asyncio.Future[None]] = set()
        self._follower: asyncio.Task[None] | None = None
        self._closed = False
        bundle = trust_bundle() if trust_bundle is not None else None
        self._current = self._connect(bundle)
        self._watches: list[Watch[Any]] = []

    # --- the channel and the trust bundle --------------------------------------------------

    def _connect(self, bundle: TrustBundle | None) -> Channel:
        roots = self._roots
        if bundle is not None:
            roots = bundle.pem()
            self.trust_bundle_digest = bundle.digest
        if self.server_name is None:
            roots = None
        return self._channels(self.target, roots_pem=roots, server_name=self.server_name)

    def _channel(self) -> Channel:
        """The channel a stream opens on: the current one, rebuilt first if the bundle moved."""
        self.check_trust_bundle()
        return self._current

    def check_trust_bundle(self) -> bool:
        """Re-read the trust-bundle provider; True when it changed and a new channel was built.

        The old channel keeps serving its streams until the new one connects (at most
        ``handover_grace`` seconds), then it is closed and its watches resubscribe.
        """
        if self._trust_bundle is None or self._closed:
            return False
        try:
            bundle = self._trust_bundle()
        except Exception:  # a provider bug must not stop the watches; keep the channel in use
            log.exception("cannot read the trust bundle for the destination channel")
            return False
        if bundle.digest == self.trust_bundle_digest:
            return False
        log.info(
            "trust bundle %s… in use: new destination channel, the old one goes once it connects",
            bundle.digest[:16],
        )
        self._retired.append(self._current)
        self._current = self._connect(bundle)
        self.metrics.channel_rebuilds += 1
        loop = asyncio.get_running_loop()
        if self._handover_deadline is None:
            # Measured from the first retirement: bundles changing again and again cannot
            # keep an outdated channel alive past one grace period.
            self._handover_deadline = loop.time() + self.handover_grace
        if self._handover is not None:
            self._handover.cancel()  # superseded: the new handover waits for the newest channel
        self._handover = asyncio.ensure_future(
            self._hand_over(self._current, self._handover_deadline)
        )
        return True

    async def _hand_over(self, channel: Channel, deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await channel.ready()
        except TimeoutError:
            log.warning(
                "the destination service did not accept a connection verified with trust "
                "bundle %s… within %.0fs; closing the channel built on the previous bundle",
                (self.trust_bundle_digest or "")[:16],
                self.handover_grace,
            )
        retired, self._retired = self._retired, []
        self._handover_deadline = None
        # Shielded: a newer handover cancelling this task must not leave a channel half-closed.
        closing = asyncio.ensure_future(_close_channels(retired))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        await asyncio.shield(closing)

    async def _follow_trust_bundle(self) -> None:
        while True:
            await asyncio.sleep(self.bundle_check_interval)
            self.check_trust_bundle()

    @property
    def control_plane_up(self) -> bool:
        """False while any watch is serving its last-known state."""
        return not any(w.stale and not w.done for w in self._watches)

    def _stale_changed(self) -> None:
        stale = sum(1 for w in self._watches if w.stale and not w.done)
        self.metrics.stale = stale
        self.metrics.up = 0 if stale else 1

    def _add(self, watch: Watch[Any]) -> Any:
        if self._trust_bundle is not None and self._follower is None:
            # Started with the first watch: streams that never break must move channels too.
            self._follower = asyncio.ensure_future(self._follow_trust_bundle())
        self._watches.append(watch)
        self._stale_changed()
        return watch

    async def forget(self, watch: Watch[Any]) -> None:
        """Close ``watch`` and stop tracking it (a watch its owner no longer needs)."""
        await watch.close()
        if watch in self._watches:
            self._watches.remove(watch)
            self._stale_changed()

    def resolve(self, authority: str) -> Watch[EndpointSet]:
        """Endpoints of ``authority`` (``<svc>.<ns>.svc.<domain>:<port>``)."""
        request = lite.encode(
            "io.linkerd.proxy.destination.GetDestination",
            scheme="k8s",
            path=authority,
            context_token=self.workload.token(),
        )

        def fold(current: EndpointSet | None, msg: lite.Message) -> EndpointSet:
            change = update_from_proto(msg)
            base = current or EndpointSet(authority)
            if isinstance(change, NoEndpoints) and not change.exists:
                return EndpointSet(authority, (), exists=False)
            return apply(base, change)

        return self._add(
            Watch(
                self,
                "destination",
                GET,
                request,
                lite.decoder(UPDATE),
                fold,
                lambda: None,
                on_not_found=lambda: EndpointSet(authority, (), exists=False),
            )
        )

    def inbound_policy(
        self, port: int, workload: WorkloadRef | None = None
    ) -> Watch[InboundPolicy]:
        """The policy of one of this workload's inbound ports."""
        ref = workload or self.workload
        if ref.namespace is None or ref.name is None:
            raise InvalidTarget("inbound policy needs the workload's namespace and name")
        request = lite.encode(
            "trustmesh.policy.v1.PortSpec", workload=f"{ref.namespace}:{ref.name}", port=port
        )
        return self._add(
            Watch(
                self,
                "inbound",
                INBOUND_WATCH,
                request,
                lite.decoder(INBOUND_POLICY),
                lambda _old, msg: inbound_from_proto(msg),
                lambda: None,
            )
        )

    def outbound_policy(self, authority: str) -> Watch[OutboundPolicy]:
        """The outbound policy (routes, timeouts, retries) of ``authority``. A service that
        does not exist is an answer, not an outage: a policy without routes (not stale)."""
        request = lite.encode(
            "trustmesh.policy.v1.TrafficSpec",
            source_workload=self.workload.token(),
            authority=authority,
        )
        return self._add(
            Watch(
                self,
                "outbound",
                OUTBOUND_WATCH,
                request,
                lite.decoder(OUTBOUND_POLICY),
                lambda _old, msg: outbound_from_proto(msg),
                lambda: None,
                on_not_found=lambda: OutboundPolicy(
                    authority, Ref("default", "not-found"), Protocol.DETECT, ()
                ),
            )
        )

    def trust_bundle(self, digest: str = "") -> Watch[Any]:
        """The mesh's trust anchors (:class:`TrustBundleSnapshot`), renewed on every change."""
        request = lite.encode(
            "trustmesh.policy.v1.TrustBundleRequest", workload=self.workload.token(), digest=digest
        )
        return self._add(
            Watch(
                self,
                "trust_bundle",
                BUNDLES_WATCH,
                request,
                lite.decoder(TRUST_BUNDLE),
                lambda _old, msg: bundle_from_proto(msg),
                lambda: None,
            )
        )

    async def close(self) -> None:
        self._closed = True
        for task in (self._follower, self._handover):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for w in self._watches:
            await w.close()
        self._watches.clear()
        retired, self._retired = self._retired, []
        await _close_channels([*retired, self._current])
        if self._closing:
            await asyncio.gather(*self._closing)

    async def __aenter__(self) -> DestinationClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _close_channels(channels: list[Channel]) -> None:
    # Closing cancels the streams still open on a channel; their watches reconnect.
    for channel in channels:
        await channel.close()
