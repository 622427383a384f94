"""The proxy's side of identity: obtain a workload certificate and keep it fresh.

Each renewal generates a fresh key (Linkerd reuses one key for the pod's life; TrustMesh does
not), builds a CSR, calls ``Certify`` with the token re-read from its provider, and checks the
answer before using it: the chain must verify against the current trust bundle and the leaf
must carry the requested identity. The schedule is Linkerd's: refresh at 70 % of the remaining
life, clamped to [10 s, 24 h]; failures retry with jittered exponential backoff, never later
than that refresh point. Clock, sleep and randomness are injected so tests drive explicit times.
The gRPC channel is given too (:class:`protos.rpc.ChannelFactory`): the proxy's own, without
grpcio, in the sidecar.

Usage::

    client = IdentityClient(IdentityClientConfig(addr, identity), token_provider, bundle_provider,
                            channels=proxy.rpc.Channel, clock=utcnow)
    task = asyncio.create_task(client.run())
    await client.wait_ready(timeout=10)
    cred = client.current()          # pki.certs.Credential: leaf, chain, key
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from identity.errors import IdentityError
from pki.bundle import TrustBundle
from pki.certs import Certificate, Credential
from pki.csr import create_csr
from pki.errors import PKIError
from pki.keys import KeyAlgorithm, PrivateKey
from pki.renewal import refresh_delay
from pki.verify import verify_leaf
from protos import lite
from protos.rpc import ChannelFactory, RpcError

log = logging.getLogger(__name__)

CERTIFY = "/io.linkerd.proxy.identity.Identity/Certify"
CERTIFY_REQUEST = "io.linkerd.proxy.identity.CertifyRequest"
CERTIFY_RESPONSE = "io.linkerd.proxy.identity.CertifyResponse"


class IdentityClientError(IdentityError):
    """A Certify attempt failed, or its answer was not acceptable."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Jittered exponential backoff: ``min(cap, base·2^(n-1))``, shortened by up to ``jitter``."""

    base: timedelta = timedelta(milliseconds=100)
    cap: timedelta = timedelta(seconds=10)
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.base <= timedelta(0) or self.cap < self.base:
            raise ValueError("backoff needs 0 < base <= cap")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"backoff jitter must be in [0, 1), got {self.jitter}")

    def delay(self, failures: int, sample: float) -> timedelta:
        """The wait after ``failures`` consecutive failures (≥ 1); ``sample`` in [0, 1)."""
        if failures < 1:
            raise ValueError("failures must be at least 1")
        if not 0.0 <= sample < 1.0:
            raise ValueError(f"sample must be in [0, 1), got {sample}")
        raw = min(self.cap, self.base * (2 ** min(failures - 1, 32)))
        return raw * (1.0 - self.jitter * sample)


def next_refresh(
    expires_at: datetime | None,
    now: datetime,
    *,
    failures: int,
    backoff: Backoff,
    sample: float,
) -> timedelta:
    """How long to sleep before the next Certify (pure).

    After a success (``failures == 0``): Linkerd's 70 % of the remaining life, in [10 s, 24 h].
    After a failure: the backoff, but never past the refresh point of the certificate still held.
    """
    scheduled = refresh_delay(expires_at, now)
    if failures == 0:
        return scheduled
    retry = backoff.delay(failures, sample)
    if expires_at is not None and expires_at > now:
        return min(retry, scheduled)
    return retry


@dataclass(frozen=True, slots=True)
class IdentityClientConfig:
    """Where to certify and as whom."""

    addr: str
    identity: str
    # TLS name of the identity service (trustmesh-identity.<ns>.serviceaccount…); None = plain.
    server_name: str | None = None
    key_algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256
    timeout: float = 10.0
    backoff: Backoff = Backoff()

    def __post_init__(self) -> None:
        if not self.addr or not self.identity:
            raise ValueError("addr and identity are required")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")


class IdentityClient:
    """Certifies ``config.identity`` and renews it until cancelled."""

    def __init__(
        self,
        config: IdentityClientConfig,
        token: Callable[[], bytes],
        trust_bundle: Callable[[], TrustBundle],
        *,
        channels: ChannelFactory,
        clock: Callable[[], datetime],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        on_update: Callable[[Credential], None] | None = None,
    ) -> None:
        self.config = config
        self._token = token
        self._bundle = trust_bundle
        self._channels = channels
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        self._on_update = on_update
        self._current: Credential | None = None
        self._ready = asyncio.Event()
        self.failures = 0
        self.refreshes = {"ok": 0, "error": 0}
        self.last_refresh: datetime | None = None
        self.last_error: str | None = None

    # --- state --------------------------------------------------------------------------

    def current(self) -> Credential | None:
        """The certificate in use (leaf + chain + key), or None before the first success."""
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    async def wait_ready(self, timeout: float) -> Credential:
        await asyncio.wait_for(self._ready.wait(), timeout)
        assert self._current is not None
        return self._current

    @property
    def expiration(self) -> datetime | None:
        cred = self._current
        return cred.expires if cred is not None else None

    # --- one attempt --------------------------------------------------------------------

    async def certify_once(self) -> Credential:
        """One Certify round trip, checked; installs and returns the new credential."""
        cfg = self.config
        key = PrivateKey.generate(cfg.key_algorithm)
        bundle = self._bundle()
        request = lite.encode(
            CERTIFY_REQUEST,
            identity=cfg.identity,
            token=self._token(),
            certificate_signing_request=create_csr(cfg.identity, key),
            trust_bundle_digest=bundle.digest,
        )
        # A channel per attempt: the service is verified against the bundle in use now, and
        # our schedule, not a connection's reconnect backoff, decides when to try again.
        channel = self._channels(
            cfg.addr,
            roots_pem=bundle.pem() if cfg.server_name is not None else None,
            server_name=cfg.server_name,
        )
        try:
            answer = await channel.unary(CERTIFY, request, timeout=cfg.timeout)
        except RpcError as e:
            raise IdentityClientError(f"Certify failed: {e.code.name}: {e.details}") from None
        finally:
            await channel.close()
        try:
            response = lite.decode(CERTIFY_RESPONSE, answer)
        except lite.DecodeError:
            raise IdentityClientError("the Certify response does not parse") from None
        now = self._clock()
        try:
            leaf = Certificate.from_der(response.leaf_certificate)
            chain = tuple(Certificate.from_der(d) for d in response.intermediate_certificates)
            credential = Credential(leaf, key, chain)
            verify_leaf(leaf, chain, bundle, at=now, expected_identity=cfg.identity)
        except PKIError as e:
            raise IdentityClientError(f"the issued certificate is not acceptable: {e}") from None
        if leaf.not_after <= now:
            raise IdentityClientError("the issued certificate is already expired")
        # Linkerd's proxy takes valid_until as the expiry and refuses one already past: an
        # answer that contradicts itself is not used, whatever the leaf says.
        if not response.HasField("valid_until"):
            raise IdentityClientError("the response has no valid_until")
        try:
            valid_until = response.valid_until.ToDatetime(tzinfo=UTC)
        except lite.DecodeError as e:
            raise IdentityClientError(f"the response's valid_until: {e}") from None
        if valid_until <= now:
            raise IdentityClientError(
                f"the response's valid_until {valid_until.isoformat()} is already past"
            )
        self._install(credential, now)
        return credential

    def _install(self, credential: Credential, now: datetime) -> None:
        self._current = credential
        self.last_refresh = now
        self._ready.set()
        if self._on_update is not None:
            self._on_update(credential)

    # --- the loop -----------------------------------------------------------------------

    async def step(self) -> timedelta:
        """One attempt plus bookkeeping; returns the delay until the next attempt."""
        try:
            credential = await self.certify_once()
        except IdentityClientError as e:
            self.failures += 1
            self.refreshes["error"] += 1
            self.last_error = str(e)
            log.warning("Failed to obtain identity %s: %s", self.config.identity, e)
        except Exception as e:  # a bug or an unexpected transport error: keep the loop alive
            self.failures += 1
            self.refreshes["error"] += 1
            self.last_error = f"{type(e).__name__}: {e}"
            log.exception("Failed to obtain identity %s", self.config.identity)
        else:
            self.failures = 0
            self.refreshes["ok"] += 1
            self.last_error = None
            log.info("Certified identity %s until %s", self.config.identity, credential.expires)
        return next_refresh(
            self.expiration,
            self._clock(),
            failures=self.failures,
            backoff=self.config.backoff,
            sample=self._rand(),
        )

    async def run(self) -> None:
        """Certify and renew until cancelled."""
        while True:
            delay = await self.step()
            await self._sleep(max(delay, timedelta(0)).total_seconds())


__all__ = [
    "Backoff",
    "IdentityClient",
    "IdentityClientConfig",
    "IdentityClientError",
    "next_refresh",
]
