"""Local workload tokens: compact JWS (RFC 7515) signed with ES256, as the embedded mesh's
counterpart of projected ServiceAccount tokens.

A token says "the bearer is service account ``sub`` (``system:serviceaccount:<ns>:<sa>``), for
audience ``aud``, between ``nbf`` and ``exp``". The control plane's token signing key lives in the
:class:`~pki.store.FileStore` as ``token-signing.key`` (0600), created on first use under the
store lock. Verification accepts only ES256 with the expected key id; ``alg: none`` and every
other algorithm are refused, so a token cannot choose how it is checked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from pki.errors import (
    StoreNotInitialized,
    TokenAudienceMismatch,
    TokenExpired,
    TokenIssuerMismatch,
    TokenMalformed,
    TokenNotYetValid,
    TokenSignatureInvalid,
    quoted,
)
from pki.keys import KeyAlgorithm, PrivateKey
from pki.store import FileStore

TOKEN_KEY_FILE = "token-signing.key"
DEFAULT_TOKEN_ISSUER = "trustmesh-identity"
# Tokens are a few hundred bytes; anything this large is refused before decoding.
MAX_TOKEN_BYTES = 8 * 1024
_ES256_SIGNATURE_BYTES = 64


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """The claims of a workload token. Times are whole seconds, UTC."""

    subject: str
    audience: str
    issued_at: datetime
    expires_at: datetime
    issuer: str = DEFAULT_TOKEN_ISSUER
    not_before: datetime | None = None

    def __post_init__(self) -> None:
        for field, value in (("subject", self.subject), ("audience", self.audience)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"token {field} must be a non-empty string")
        if not isinstance(self.issuer, str) or not self.issuer:
            raise ValueError("token issuer must be a non-empty string")
        for field, when in (("issued_at", self.issued_at), ("expires_at", self.expires_at)):
            if not isinstance(when, datetime) or when.tzinfo is None:
                raise ValueError(f"token {field} must be a timezone-aware datetime")
        if self.expires_at <= self.issued_at:
            raise ValueError("token expires_at must be after issued_at")

    @property
    def valid_from(self) -> datetime:
        return self.not_before if self.not_before is not None else self.issued_at

    def check_time(self, now: datetime, leeway: timedelta = timedelta(0)) -> None:
        """Raise unless ``now`` is inside [valid_from, expires_at) give or take ``leeway``.

        Kept apart from the signature check so that a cache of verified tokens applies exactly
        the same window at every use.
        """
        if now + leeway < self.valid_from:
            raise TokenNotYetValid(f"token is not valid before {self.valid_from.isoformat()}")
        if now - leeway >= self.expires_at:
            raise TokenExpired(f"token expired at {self.expires_at.isoformat()}")


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(part: bytes, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise TokenMalformed(f"token {what} is not base64url") from None


def key_id(key: PrivateKey) -> str:
    """The ``kid`` of a signing key: base64url of the first 12 bytes of SHA-256(SPKI)."""
    return _b64(hashlib.sha256(key.public_key_der()).digest()[:12]).decode()


def _epoch(when: datetime) -> int:
    return int(when.timestamp())


def sign_token(claims: TokenClaims, key: PrivateKey) -> bytes:
    """Encode and sign ``claims`` as a compact JWS (ES256)."""
    if key.algorithm is not KeyAlgorithm.ECDSA_P256:
        raise TypeError("workload tokens are signed with an ECDSA P-256 key (ES256)")
    header = {"alg": "ES256", "typ": "JWT", "kid": key_id(key)}
    payload: dict[str, Any] = {
        "iss": claims.issuer,
        "sub": claims.subject,
        "aud": claims.audience,
        "iat": _epoch(claims.issued_at),
        "exp": _epoch(claims.expires_at),
    }
    if claims.not_before is not None:
        payload["nbf"] = _epoch(claims.not_before)
    return sign_compact(header, payload, key)


def sign_compact(header: Mapping[str, Any], payload: Mapping[str, Any], key: PrivateKey) -> bytes:
    """Sign arbitrary JSON ``header`` and ``payload`` (tests use it to build odd tokens)."""
    signing_input = (
        _b64(json.dumps(header, separators=(",", ":")).encode())
        + b"."
        + _b64(json.dumps(payload, separators=(",", ":")).encode())
    )
    r, s = decode_dss_signature(key.sign(signing_input))
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signing_input + b"." + _b64(signature)


def _json_object(part: bytes, what: str) -> Mapping[str, Any]:
    try:
        value = json.loads(_unb64(part, what))
    except (ValueError, UnicodeDecodeError):
        raise TokenMalformed(f"token {what} is not JSON") from None
    if not isinstance(value, dict):
        raise TokenMalformed(f"token {what} is not a JSON object")
    return value


def _time_claim(payload: Mapping[str, Any], name: str, *, required: bool) -> datetime | None:
    value = payload.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenMalformed(f"token claim {name!r} must be a number of seconds since the epoch")
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise TokenMalformed(f"token claim {name!r} is out of range") from None


def _string_claim(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise TokenMalformed(f"token claim {name!r} must be a non-empty string")
    return value


def verify_token(
    token: bytes,
    key: PrivateKey,
    *,
    audience: str,
    now: datetime,
    issuer: str = DEFAULT_TOKEN_ISSUER,
    leeway: timedelta = timedelta(0),
) -> TokenClaims:
    """Check ``token`` against the signing ``key`` at ``now``; return its claims or raise.

    Order: size and shape, header (ES256, our key id), signature, then issuer, audience and the
    validity window, so that an unsigned token never reveals which claim would have failed.
    """
    verifier = TokenVerifier(key, audience=audience, issuer=issuer, leeway=leeway)
    return verifier.verify(token, now=now)


class TokenVerifier:
    """:func:`verify_token` for one key, audience and issuer, with the key id and public key
    derived once (the identity service checks every Certify token with the same key)."""

    __slots__ = ("_kid", "_public", "audience", "issuer", "leeway")

    def __init__(
        self,
        key: PrivateKey,
        *,
        audience: str,
        issuer: str = DEFAULT_TOKEN_ISSUER,
        leeway: timedelta = timedelta(0),
    ) -> None:
        public = key.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise TypeError("token verification needs an ECDSA P-256 key")
        if not isinstance(audience, str) or not audience:
            raise ValueError("token audience must be a non-empty string")
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self._kid = key_id(key)
        self._public = public

    def verify(self, token: bytes, *, now: datetime) -> TokenClaims:
        """Check ``token`` at ``now``; return its claims or raise a :class:`TokenError`."""
        claims = self.verify_signed(token)
        claims.check_time(now, self.leeway)
        return claims

    def verify_signed(self, token: bytes) -> TokenClaims:
        """Everything but the validity window: shape, key id, signature, issuer, audience.

        The caller must apply :meth:`TokenClaims.check_time` before trusting the claims.
        """
        if not isinstance(token, bytes | bytearray):
            raise TypeError(f"token must be bytes, not {type(token).__name__}")
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenMalformed(
                f"token is {len(token)} bytes, over the limit of {MAX_TOKEN_BYTES}"
            )
        token = bytes(token).strip()
        parts = token.split(b".")
        if len(parts) != 3 or not all(parts):
            raise TokenMalformed("token is not a compact JWS (three non-empty base64url parts)")
        header = _json_object(parts[0], "header")
        if header.get("alg") != "ES256":
            raise TokenMalformed(
                f"token algorithm {quoted(header.get('alg'))} is not allowed; only ES256"
            )
        if header.get("kid") != self._kid:
            raise TokenSignatureInvalid(
                f"token was signed by key {quoted(header.get('kid'))}, not this control plane's key"
            )
        payload = _json_object(parts[1], "payload")
        signature = _unb64(parts[2], "signature")
        if len(signature) != _ES256_SIGNATURE_BYTES:
            raise TokenMalformed(f"token signature is {len(signature)} bytes, ES256 needs 64")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            self._public.verify(der, parts[0] + b"." + parts[1], ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise TokenSignatureInvalid(
                "token signature does not verify (forged or altered)"
            ) from None
        claims = _claims(payload)
        if claims.issuer != self.issuer:
            raise TokenIssuerMismatch(
                f"token issuer is {quoted(claims.issuer)}, expected {self.issuer!r}"
            )
        if claims.audience != self.audience:
            raise TokenAudienceMismatch(
                f"token audience is {quoted(claims.audience)}, expected {self.audience!r}"
            )
        return claims


def _claims(payload: Mapping[str, Any]) -> TokenClaims:
    aud = payload.get("aud")
    if isinstance(aud, list) and len(aud) == 1:
        aud = aud[0]  # RFC 7519 allows a one-element array
    if not isinstance(aud, str) or not aud:
        raise TokenMalformed("token claim 'aud' must be one non-empty string")
    issued = _time_claim(payload, "iat", required=True)
    expires = _time_claim(payload, "exp", required=True)
    assert issued is not None and expires is not None
    if expires <= issued:
        raise TokenMalformed("token claim 'exp' is not after 'iat'")
    return TokenClaims(
        subject=_string_claim(payload, "sub"),
        audience=aud,
        issued_at=issued,
        expires_at=expires,
        issuer=_string_claim(payload, "iss"),
        not_before=_time_claim(payload, "nbf", required=False),
    )


def token_signing_key(store: FileStore, *, now: datetime, wait: float = 5.0) -> PrivateKey:
    """The store's token signing key, created (P-256, committed under the lock) on first use."""
    if store.current_version() is None:
        raise StoreNotInitialized(
            f"no TrustMesh store at {store.root}; run 'trustmesh pki anchor create' first"
        )
    data = store.read_file(TOKEN_KEY_FILE)
    if data is not None:
        return PrivateKey.load(data)
    with store.lock(wait=wait):
        data = store.read_file(TOKEN_KEY_FILE)  # another process may have won the race
        if data is not None:
            return PrivateKey.load(data)
        key = PrivateKey.generate(KeyAlgorithm.ECDSA_P256)
        store.commit({TOKEN_KEY_FILE: key.to_pem()}, reason="token signing key created", now=now)
        return key
