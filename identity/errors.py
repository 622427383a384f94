"""The identity package's error tree and its one mapping to gRPC status codes.

Codes follow Linkerd's identity controller where it has one (so operators and proxies see the
same behaviour): missing fields and unparseable input are ``INVALID_ARGUMENT``; a CSR that parses
but is not acceptable, a token that does not authenticate and a token for another identity are
``FAILED_PRECONDITION``; no issuer yet is ``UNAVAILABLE``. TrustMesh additions: oversized input
is ``RESOURCE_EXHAUSTED`` (refused before parsing) and an issuer that stopped verifying against
the anchors is ``UNAVAILABLE`` (Linkerd leaks it as ``UNKNOWN``).
"""

from __future__ import annotations

from pki import errors as pki_errors
from protos.rpc import StatusCode


class IdentityError(Exception):
    """Base class of every error raised by the identity package."""


class IssuerNotReady(IdentityError):
    """No valid issuer has been loaded yet."""


class IssuerInvalid(IdentityError):
    """The loaded issuer no longer verifies against the trust anchors (e.g. it expired)."""


class IssuerRejected(IdentityError):
    """A candidate issuer was refused at load time (not a CA, wrong key, untrusted chain)."""


class IssuerSourceError(IdentityError):
    """An issuer source cannot be read (missing files, unreadable Secret, API failure)."""


class StartupError(IdentityError):
    """The service cannot start: an address cannot be bound, or the Kubernetes client
    configuration cannot be loaded."""


class InvalidRequest(IdentityError):
    """A Certify request lacks a field or carries an unusable value."""


class RequestTooLarge(IdentityError):
    """A request field is over its size limit; it was not parsed."""


class TokenInvalid(IdentityError):
    """The token is malformed, or the token reviewer reported an error about it."""


class TokenNotAuthenticated(IdentityError):
    """The token is well-formed but does not authenticate (forged, expired, wrong audience)."""


class TokenReviewFailed(IdentityError):
    """The token reviewer (Kubernetes API) could not be asked."""


class IdentityMismatch(IdentityError):
    """The requested identity is not the one the token proves."""


class IssuanceFailed(IdentityError):
    """Signing failed after every check passed."""


# (error class, gRPC code, metrics result label); the first isinstance match wins, so the more
# specific classes come first.
_TABLE: tuple[tuple[type[BaseException], StatusCode, str], ...] = (
    (IssuerNotReady, StatusCode.UNAVAILABLE, "not_ready"),
    (IssuerInvalid, StatusCode.UNAVAILABLE, "issuer_invalid"),
    (RequestTooLarge, StatusCode.RESOURCE_EXHAUSTED, "too_large"),
    (pki_errors.CSRTooLarge, StatusCode.RESOURCE_EXHAUSTED, "too_large"),
    (InvalidRequest, StatusCode.INVALID_ARGUMENT, "invalid_request"),
    (pki_errors.CSRMalformed, StatusCode.INVALID_ARGUMENT, "invalid_request"),
    (pki_errors.CSRError, StatusCode.FAILED_PRECONDITION, "csr_refused"),
    (TokenInvalid, StatusCode.INVALID_ARGUMENT, "token_invalid"),
    (pki_errors.TokenMalformed, StatusCode.INVALID_ARGUMENT, "token_invalid"),
    (TokenNotAuthenticated, StatusCode.FAILED_PRECONDITION, "unauthenticated"),
    (pki_errors.TokenError, StatusCode.FAILED_PRECONDITION, "unauthenticated"),
    (IdentityMismatch, StatusCode.FAILED_PRECONDITION, "identity_mismatch"),
    (TokenReviewFailed, StatusCode.INTERNAL, "token_review_failed"),
    (IssuanceFailed, StatusCode.INTERNAL, "internal"),
)

RESULT_OK = "ok"
RESULT_INTERNAL = "internal"
RESULTS: tuple[str, ...] = (RESULT_OK, *sorted({label for _, _, label in _TABLE}))


def status_of(error: BaseException) -> tuple[StatusCode, str, str]:
    """``(code, message, result label)`` for a Certify failure.

    Unknown exceptions become ``INTERNAL`` with a generic message: their text may hold anything,
    and the caller logs them in full instead.
    """
    for cls, code, label in _TABLE:
        if isinstance(error, cls):
            return code, str(error) or cls.__name__, label
    return StatusCode.INTERNAL, "internal error while issuing the certificate", RESULT_INTERNAL
