"""The error tree of the proxy package.

Every failure the proxy reports is a :class:`ProxyError`. The listeners map these to one
behaviour each at the edge (an HTTP status with an ``l5d-proxy-error`` header, or a closed
connection); messages are full sentences and never contain key material.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base class of every error raised by the proxy."""


class ConfigError(ProxyError, ValueError):
    """A route table, policy, credential or listener setting is invalid."""


class ListenError(ProxyError):
    """A listener cannot bind its address (in use, not local, not permitted)."""


class TransportHeaderError(ProxyError, ValueError):
    """A mesh transport header is malformed or too large."""


class TLSError(ProxyError):
    """A mesh TLS handshake or record failed."""


class PeerIdentityMismatch(TLSError):
    """The peer's certificate does not carry the identity that discovery promised."""


class KexRefused(TLSError):
    """The handshake negotiated a key-exchange group the policy does not allow."""


class AlpnRefused(TLSError):
    """The server did not select the mesh transport protocol the client offered in ALPN."""


class NoEndpoints(ProxyError):
    """A service has no endpoint to send to (HTTP 503)."""


class UnknownRoute(ProxyError):
    """No route matches the request's authority or the listener's target (HTTP 404/close)."""


class UpstreamError(ProxyError):
    """The upstream connection failed or broke mid-exchange (HTTP 502)."""


class RequestTimeout(ProxyError):
    """A route's timeout expired before the response (HTTP 504)."""


class Forbidden(ProxyError):
    """Inbound policy denied the connection or request (HTTP 403 / closed connection)."""


class MalformedRequest(ProxyError, ValueError):
    """An HTTP request the proxy refuses to forward (answered 400 with the reason)."""

    status = b"400 Bad Request"


class HeaderFieldsTooLarge(MalformedRequest):
    """A request head over the proxy's limits (answered 431)."""

    status = b"431 Request Header Fields Too Large"


def handshake_result(error: BaseException | None) -> str:
    """The ``result`` label of a failed TLS handshake in the handshake metrics."""
    return {
        "PeerIdentityMismatch": "identity_mismatch",
        "KexRefused": "kex_refused",
        "AlpnRefused": "alpn_refused",
    }.get(type(error).__name__, "error")
