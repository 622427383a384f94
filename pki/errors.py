"""The error tree of the pki package.

Every failure pki reports is a :class:`PKIError`. Callers at a boundary (gRPC service, CLI,
HTTP handler) map these classes to one status code each; messages are full sentences that name
the offending field and never contain key material.
"""

from __future__ import annotations

# How much of a value a client sent an error message repeats: a status message over gRPC's
# metadata limit reaches the client as RESOURCE_EXHAUSTED "Stream removed", not as the reason.
QUOTE_LIMIT = 80


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters when longer."""
    shown = repr(value)
    if len(shown) <= limit:
        return shown
    return f"{shown[:limit]}... ({len(str(value))} characters)"  # ASCII: it may become a header


class PKIError(Exception):
    """Base class of every error raised by pki."""


class InvalidName(PKIError, ValueError):
    """An identity name, SPIFFE ID, namespace or trust domain is malformed."""


class InvalidDuration(PKIError, ValueError):
    """A duration string such as ``24h`` could not be parsed."""


class UnsupportedAlgorithm(PKIError, ValueError):
    """A key or signature algorithm TrustMesh does not support (or does not allow here)."""


class KeyLoadError(PKIError, ValueError):
    """A private or public key could not be loaded, or does not match its certificate."""


class CertificateParseError(PKIError, ValueError):
    """Bytes that should hold a certificate (PEM or DER) do not."""


class CertificateBuildError(PKIError, ValueError):
    """A certificate cannot be built from the given parameters (e.g. the chain ends too soon)."""


# --- CSR validation -------------------------------------------------------------------------


class CSRError(PKIError, ValueError):
    """A certificate signing request was refused."""


class CSRTooLarge(CSRError):
    """The CSR is larger than the configured limit; it was not parsed."""


class CSRMalformed(CSRError):
    """The bytes are not a DER or PEM encoded PKCS#10 request."""


class CSRSignatureInvalid(CSRError):
    """The CSR's self-signature does not verify with the public key it carries."""


class CSRKeyNotAllowed(CSRError):
    """The CSR's public key algorithm is not in the allowed set."""


class CSRSubjectAltNameError(CSRError):
    """The CSR does not carry exactly one DNS SAN and nothing else."""


class CSRIdentityMismatch(CSRError):
    """The CSR names an identity other than the one requested."""


# --- chain verification ---------------------------------------------------------------------


class VerificationError(PKIError):
    """A certificate chain does not verify."""


class CertificateExpired(VerificationError):
    """A certificate in the chain is past its NotAfter at the verification time."""


class CertificateNotYetValid(VerificationError):
    """A certificate in the chain is before its NotBefore at the verification time."""


class UntrustedChain(VerificationError):
    """The chain does not end at any anchor of the trust bundle."""


class InvalidSignature(VerificationError):
    """A certificate's signature does not verify with its issuer's key."""


class ConstraintViolation(VerificationError):
    """A CA constraint (basic constraints, key usage, path length, EKU) is violated."""


class IdentityMismatch(VerificationError):
    """The leaf certificate does not carry the expected identity."""


# --- trust bundles, stores, KEM -------------------------------------------------------------


class BundleError(PKIError, ValueError):
    """A trust bundle operation is invalid (empty bundle, unknown fingerprint, ...)."""


class StoreError(PKIError):
    """A credential store cannot be read or written."""


class StoreNotInitialized(StoreError):
    """The store has no trust anchor (or no issuer) yet."""


class StoreLocked(StoreError):
    """Another process holds the store's lock."""


class StoreCorrupt(StoreError):
    """The store's current version is unreadable or inconsistent."""


class KEMError(PKIError, ValueError):
    """Sealing or unsealing with the hybrid KEM failed (wrong key, tampered data, bad format)."""


class TokenError(PKIError, ValueError):
    """A signed workload token is malformed, forged, expired or for another audience."""


class TokenMalformed(TokenError):
    """The bytes are not a compact ES256 JWS with the claims TrustMesh requires."""


class TokenSignatureInvalid(TokenError):
    """The token's signature does not verify with the control plane's key (forged or foreign)."""


class TokenExpired(TokenError):
    """The token is past its ``exp``."""


class TokenNotYetValid(TokenError):
    """The token is before its ``nbf``."""


class TokenAudienceMismatch(TokenError):
    """The token was issued for another audience."""


class TokenIssuerMismatch(TokenError):
    """The token was issued by someone other than the expected issuer."""


class EndpointError(PKIError):
    """A live TLS endpoint could not be reached or did not complete a handshake."""
