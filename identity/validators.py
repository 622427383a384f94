"""Token validators: who does the bearer of a Certify token claim to be, and is it true?

``LocalTokenValidator`` checks the embedded mesh's ES256 workload tokens (pki.tokens) against the
control plane's key. ``KubernetesTokenValidator`` asks the API server with a TokenReview for the
identity audience and, like Linkerd, retries without audience when the API says the token's
audiences do not match (legacy, non-projected tokens). Both return the service account's
:class:`~pki.names.Identity` in this mesh's control-plane namespace and trust domain.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from identity.errors import TokenInvalid, TokenNotAuthenticated, TokenReviewFailed
from pki import tokens
from pki.errors import quoted
from pki.keys import PrivateKey
from pki.names import Identity, is_dns1123_label
from pki.store import FileStore

# The projected-token audience Linkerd's injector requests (and TrustMesh's, for compatibility).
DEFAULT_AUDIENCE = "identity.l5d.io"


class TokenValidator(Protocol):
    async def validate(self, token: bytes) -> Identity:
        """The identity ``token`` proves, or raise an IdentityError / pki TokenError."""
        ...


@dataclass(frozen=True, slots=True)
class Domain:
    """Where identities live: the control-plane namespace and the trust domain."""

    control_plane_namespace: str
    trust_domain: str

    def __post_init__(self) -> None:
        Identity("probe", "probe", self.control_plane_namespace, self.trust_domain)


def service_account_username(namespace: str, service_account: str) -> str:
    """The Kubernetes username of a service account, also the ``sub`` of local tokens."""
    return f"system:serviceaccount:{namespace}:{service_account}"


def sign_workload_token(
    store: FileStore,
    namespace: str,
    service_account: str,
    *,
    now: datetime,
    ttl: timedelta,
    audience: str = DEFAULT_AUDIENCE,
) -> bytes:
    """A local workload token for ``service_account`` in ``namespace``, signed with the store's
    token key (created on first use): what ``LocalTokenValidator`` accepts."""
    now = now.replace(microsecond=0)
    claims = tokens.TokenClaims(
        subject=service_account_username(namespace, service_account),
        audience=audience,
        issued_at=now,
        expires_at=now + ttl,
    )
    return tokens.sign_token(claims, tokens.token_signing_key(store, now=now))


def identity_from_username(username: str, domain: Domain) -> Identity:
    """Parse ``system:serviceaccount:<ns>:<sa>`` (Linkerd's rules) into an identity."""
    parts = username.split(":") if isinstance(username, str) else []
    if len(parts) != 4 or parts[0] != "system":
        raise TokenInvalid(
            f"token username {quoted(username)} is not of the form system:<type>:<namespace>:<name>"
        )
    _, kind, namespace, name = parts
    for field, value in (("type", kind), ("namespace", namespace), ("name", name)):
        if not is_dns1123_label(value):
            raise TokenInvalid(
                f"token username {quoted(username)} has an invalid {field} {quoted(value)}"
            )
    if kind != "serviceaccount":
        raise TokenInvalid(f"token username {quoted(username)} is a {kind}, not a serviceaccount")
    return Identity(name, namespace, domain.control_plane_namespace, domain.trust_domain)


# Verified local tokens remembered per process. A proxy presents the same token at every renewal
# and the pods of one service account often share one, so a hit saves the ES256 verification and
# the JSON decoding (~100 µs). 16,384 entries of ~1 KiB bound the memory at ~16 MiB.
DEFAULT_TOKEN_CACHE_SIZE = 16_384


class VerifiedTokenCache:
    """A bounded LRU of tokens whose signature, issuer and audience were verified.

    The key is the SHA-256 of the exact token bytes, so a hit is the same token, byte for byte;
    the value is the token's claims and the identity they name. Only what does not change with
    time is cached: the validity window is checked again at every use, so an expired token is
    refused even when cached. Failures are never cached. Thread-safe.
    """

    def __init__(self, capacity: int = DEFAULT_TOKEN_CACHE_SIZE) -> None:
        if capacity < 0:
            raise ValueError(f"token cache capacity must not be negative, got {capacity}")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, tuple[tokens.TokenClaims, Identity]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def digest(token: bytes) -> bytes:
        return hashlib.sha256(token).digest()

    def get(self, digest: bytes) -> tuple[tokens.TokenClaims, Identity] | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(digest)
            self.hits += 1
            return entry

    def put(self, digest: bytes, claims: tokens.TokenClaims, identity: Identity) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._entries[digest] = (claims, identity)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)


class LocalTokenValidator:
    """Verifies locally signed workload tokens (ES256, key held by the control plane).

    ``leeway`` widens the token's validity window at both ends for clocks that disagree (the
    service passes its clock-skew allowance; Kubernetes allows a minute for its own tokens).
    """

    def __init__(
        self,
        key: PrivateKey,
        domain: Domain,
        *,
        clock: Callable[[], datetime],
        audience: str = DEFAULT_AUDIENCE,
        issuer: str = tokens.DEFAULT_TOKEN_ISSUER,
        cache_size: int = DEFAULT_TOKEN_CACHE_SIZE,
        leeway: timedelta = timedelta(0),
    ) -> None:
        if leeway < timedelta(0):
            raise ValueError(f"token leeway must not be negative, got {leeway}")
        self._verifier = tokens.TokenVerifier(key, audience=audience, issuer=issuer, leeway=leeway)
        self._domain = domain
        self._clock = clock
        self.leeway = leeway
        self.cache = VerifiedTokenCache(cache_size)

    def check(self, token: bytes) -> Identity:
        """Synchronous validation (no I/O): the hot path of the embedded mesh."""
        if not isinstance(token, bytes | bytearray):
            raise TypeError(f"token must be bytes, not {type(token).__name__}")
        now = self._clock()
        digest = self.cache.digest(token)
        entry = self.cache.get(digest)
        if entry is not None:
            claims, identity = entry
            # The verifier's audience and issuer are fixed, but a cached entry must still meet
            # them, whatever put it there; the window is the one part that moves with time.
            if (
                claims.audience == self._verifier.audience
                and claims.issuer == self._verifier.issuer
            ):
                claims.check_time(now, self.leeway)
                return identity
        claims = self._verifier.verify(token, now=now)
        identity = identity_from_username(claims.subject, self._domain)
        self.cache.put(digest, claims, identity)
        return identity

    async def validate(self, token: bytes) -> Identity:
        return self.check(token)


class KubernetesTokenValidator:
    """TokenReview through the official ``kubernetes`` client (run in a worker thread)."""

    def __init__(
        self, api_client: Any, domain: Domain, *, audience: str = DEFAULT_AUDIENCE
    ) -> None:
        from kubernetes import client as k8s

        self._api = k8s.AuthenticationV1Api(api_client)
        self._k8s = k8s
        self._domain = domain
        self._audience = audience

    def _review(self, token: str, audiences: list[str] | None) -> Any:
        k8s = self._k8s
        body = k8s.V1TokenReview(spec=k8s.V1TokenReviewSpec(token=token, audiences=audiences))
        try:
            return self._api.create_token_review(body)
        except Exception as e:  # ApiException, urllib3 errors: the API could not be asked
            reason = getattr(e, "reason", None) or type(e).__name__
            raise TokenReviewFailed(
                f"TokenReview request to the Kubernetes API failed: {reason}"
            ) from None

    def check(self, token: bytes) -> Identity:
        try:
            text = token.decode("ascii")
        except UnicodeDecodeError:
            raise TokenInvalid("token is not ASCII; a ServiceAccount token is a JWT") from None
        review = self._review(text, [self._audience])
        status = review.status
        error = getattr(status, "error", None) or ""
        if "token audiences" in error:
            # Linkerd's fallback: legacy tokens carry the API server's audience, not ours.
            review = self._review(text, None)
            status = review.status
            error = getattr(status, "error", None) or ""
        if status is None:
            raise TokenReviewFailed("TokenReview returned no status")
        if error:
            raise TokenInvalid(f"token review failed: {error}")
        if not status.authenticated:
            raise TokenNotAuthenticated("authentication token could not be authenticated")
        username = getattr(status.user, "username", None) or ""
        return identity_from_username(username, self._domain)

    async def validate(self, token: bytes) -> Identity:
        return await asyncio.to_thread(self.check, token)
