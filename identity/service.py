"""The Certify decision, independent of gRPC: checks in Linkerd's order, then issuance.

Order (linkerd2 ``pkg/identity/service.go``; the first failure decides the status code):

1. an issuer is loaded;
2. the request is complete and within size limits, and the CSR parses (refused before parsing
   when oversized);
3. the issuer is still inside its validity window, and so are its chain and anchors;
4. the CSR: allowed key algorithm, valid self-signature (Linkerd skips this), exactly one DNS SAN
   equal to the requested identity, CN empty or equal (a CSR that passed for this identity
   before, byte for byte, in a request whose token proved the identity, is remembered: its
   parse and these checks are not repeated);
5. the token proves a service account;
6. the requested identity is that service account's;
7. sign.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from identity.errors import (
    IdentityMismatch,
    InvalidRequest,
    IssuanceFailed,
    IssuerInvalid,
    IssuerNotReady,
    RequestTooLarge,
)
from identity.issuer import Issuer
from identity.validators import TokenValidator
from pki.certs import DEFAULT_CLOCK_SKEW, DEFAULT_LEAF_LIFETIME, Certificate, issue_leaf
from pki.csr import DEFAULT_MAX_CSR_BYTES, ValidatedCSR, parse_csr, validate_csr
from pki.durations import format_duration
from pki.errors import PKIError
from pki.keys import KeyAlgorithm
from pki.tokens import MAX_TOKEN_BYTES
from pki.verify import anchor_for

log = logging.getLogger(__name__)

MAX_IDENTITY_BYTES = 253  # a DNS name
# Far beyond any issuer's life (leaves are clamped to it anyway), and short enough that the
# validity window (now - skew .. now + lifetime + skew) can never overflow the date range.
MAX_LIFETIME = timedelta(days=3650)
# CSRs that passed validation, by identity and the SHA-256 of their bytes. A proxy sends the same
# CSR on every renewal (Linkerd's makes its key and CSR once at startup), and parsing plus the
# signature check is ~100 µs of a ~600 µs Certify. Only exact bytes that were verified hit, and
# only for the identity they were verified for; each entry is a few hundred bytes.
CSR_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class IssuancePolicy:
    """What the service issues and what it accepts."""

    lifetime: timedelta = DEFAULT_LEAF_LIFETIME
    clock_skew: timedelta = DEFAULT_CLOCK_SKEW
    allowed_algorithms: tuple[KeyAlgorithm, ...] = (KeyAlgorithm.ECDSA_P256,)
    max_csr_bytes: int = DEFAULT_MAX_CSR_BYTES
    max_token_bytes: int = MAX_TOKEN_BYTES

    def __post_init__(self) -> None:
        if not timedelta(0) < self.lifetime <= MAX_LIFETIME:
            raise ValueError(
                f"issuance lifetime must be positive and at most {MAX_LIFETIME.days} days, "
                f"got {format_duration(self.lifetime)}"
            )
        if not timedelta(0) <= self.clock_skew <= MAX_LIFETIME:
            raise ValueError(
                f"clock skew allowance must be between 0 and {MAX_LIFETIME.days} days, "
                f"got {format_duration(self.clock_skew)}"
            )
        if not self.allowed_algorithms or not all(
            isinstance(a, KeyAlgorithm) for a in self.allowed_algorithms
        ):
            raise ValueError("allowed_algorithms must be a non-empty tuple of KeyAlgorithm")
        if self.max_csr_bytes <= 0 or self.max_token_bytes <= 0:
            raise ValueError("size limits must be positive")

    @property
    def max_request_bytes(self) -> int:
        """The largest Certify message worth reading (gRPC refuses bigger ones unread)."""
        return self.max_csr_bytes + self.max_token_bytes + MAX_IDENTITY_BYTES + 1024


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate issued by Certify, with the chain to return (issuer first, no anchor)."""

    leaf: Certificate
    chain: tuple[Certificate, ...]
    chain_der: tuple[bytes, ...] = field(repr=False)

    @property
    def valid_until(self) -> datetime:
        return self.leaf.not_after


@dataclass(frozen=True, slots=True)
class _Active:
    """The issuer in use plus what every request needs from it, computed once per reload."""

    issuer: Issuer
    anchor: Certificate | None  # the anchor whose key signed the chain's top certificate
    chain_der: tuple[bytes, ...]
    valid_from: datetime  # latest NotBefore along issuer → anchor
    valid_until: datetime  # earliest NotAfter along issuer → anchor


class Certifier:
    """Holds the current issuer and answers Certify requests."""

    def __init__(
        self,
        policy: IssuancePolicy,
        validator: TokenValidator,
        *,
        clock: Callable[[], datetime],
    ) -> None:
        self.policy = policy
        self.validator = validator
        self._clock = clock
        self._active: _Active | None = None
        self._validated: OrderedDict[tuple[str, bytes], ValidatedCSR] = OrderedDict()

    @property
    def issuer(self) -> Issuer | None:
        active = self._active
        return active.issuer if active is not None else None

    @property
    def anchor(self) -> Certificate | None:
        """The trust anchor the current issuer chains to."""
        active = self._active
        return active.anchor if active is not None else None

    def set_issuer(self, issuer: Issuer) -> None:
        """Swap the issuer (one attribute store, so in-flight requests see old or new)."""
        cred = issuer.credential
        # By signature: after a rotation the old and the new anchor often share their name,
        # and the old one, still in the bundle, must not cap the new issuer's window.
        anchor = anchor_for(cred.full_chain, issuer.bundle)
        path = cred.full_chain if anchor is None else (*cred.full_chain, anchor)
        self._active = _Active(
            issuer=issuer,
            anchor=anchor,
            chain_der=tuple(c.der for c in cred.full_chain),
            valid_from=max(c.not_before for c in path),
            valid_until=min(c.not_after for c in path),
        )

    def is_ready(self, now: datetime) -> bool:
        active = self._active
        return active is not None and active.valid_from <= now <= active.valid_until

    async def certify(self, identity: str, token: bytes, csr: bytes) -> Issued:
        """Run the checks in order and issue; raise an IdentityError or PKIError on refusal."""
        active = self._active
        if active is None:
            raise IssuerNotReady("cert issuer not ready yet")
        self._check_request(identity, token, csr)
        key = (identity, hashlib.sha256(csr).digest())
        validated = self._validated.get(key)
        if validated is None:
            parsed = parse_csr(csr, max_bytes=self.policy.max_csr_bytes)
        now = self._clock()
        if not active.valid_from <= now <= active.valid_until:
            raise IssuerInvalid(
                f"issuer {active.issuer.credential.certificate.subject} is not valid at "
                f"{now.isoformat()} (its chain is valid {active.valid_from.isoformat()} to "
                f"{active.valid_until.isoformat()}); load a new issuer"
            )
        if validated is None:
            validated = validate_csr(
                parsed,
                expected_name=identity,
                allowed_algorithms=self.policy.allowed_algorithms,
            )
        proven = await self.validator.validate(token)
        if proven.dns_name != identity:
            raise IdentityMismatch(
                f"requested identity {identity!r} did not match the token's {proven.dns_name!r}"
            )
        # Remembered only once a token proved the identity, so that requests without one
        # cannot push the proxies' CSRs out (the entry may have left during the await).
        self._validated[key] = validated
        self._validated.move_to_end(key)
        while len(self._validated) > CSR_CACHE_SIZE:
            self._validated.popitem(last=False)  # the least recently used
        try:
            leaf = issue_leaf(
                validated.public_key,
                validated.dns_name,
                active.issuer.credential,
                now=now,
                lifetime=self.policy.lifetime,
                skew=self.policy.clock_skew,
                anchor=active.anchor,
            )
        except PKIError as e:
            raise IssuanceFailed(f"signing the certificate for {identity} failed: {e}") from None
        return Issued(leaf, active.issuer.credential.full_chain, active.chain_der)

    def _check_request(self, identity: str, token: bytes, csr: bytes) -> None:
        policy = self.policy
        if len(identity) > MAX_IDENTITY_BYTES:
            raise RequestTooLarge(
                f"identity is {len(identity)} characters, over the limit of {MAX_IDENTITY_BYTES}"
            )
        if len(token) > policy.max_token_bytes:
            raise RequestTooLarge(
                f"token is {len(token)} bytes, over the limit of {policy.max_token_bytes}"
            )
        if not identity:
            raise InvalidRequest("missing identity")
        if not token:
            raise InvalidRequest("missing token")
        if not csr:
            raise InvalidRequest("missing certificate signing request")
        if csr[:1] != b"\x30":  # a DER PKCS#10 request is a SEQUENCE
            raise InvalidRequest(
                "certificate signing request is not DER (PEM and other encodings are refused)"
            )
