"""Mesh TLS: TLS 1.3 mutual authentication over pyOpenSSL memory BIOs, with hybrid key exchange.

pyOpenSSL here runs on the OpenSSL 4 bundled with pyca/cryptography, which negotiates
X25519MLKEM768 (the stdlib ``ssl`` module links an OpenSSL without ML-KEM). Sessions are
sans-IO: bytes from the socket go into :meth:`TlsSession.feed`, and whatever the session
wants to send comes back as bytes for the driver to write.

pyOpenSSL checks chains, never names, so the client checks here that the server's leaf has a
DNS SAN equal to the identity discovery promised (ignoring ASCII case, as DNS names compare:
RFC 6125 section 6.4.1) or a URI SAN exactly equal to it, and the server takes the first DNS/URI
SAN of a verified client certificate as the client identity, a DNS one in lower case (the form
the identity service issues and policies name). Contexts are built from the credential
source's current value and rebuilt when it changes, so a renewed certificate or trust bundle
applies to new connections while live ones keep their session.

Both contexts run at OpenSSL security level 2 whatever the OpenSSL configuration says: a
peer's keys need at least 112 bits of security (RSA 2048, ECC 224) and its chain no SHA-1
signatures; our own chain is held to the same bar when the credentials load (the leaf's key
by OpenSSL, the signatures here, since OpenSSL never checks the chain it sends).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _ossl

from proxy.errors import AlpnRefused, ConfigError, KexRefused, PeerIdentityMismatch, TLSError
from proxy.settings import KexPolicy
from proxy.transport_header import ALPN

log = logging.getLogger(__name__)

HYBRID_GROUP = "X25519MLKEM768"
# One hybrid key share in the ClientHello; X25519 stays acceptable to classical peers. The "/"
# puts the groups in separate preference tuples (OpenSSL 3.5+): a server takes the hybrid group
# whenever the client lists it, with a HelloRetryRequest if the client's first key share was
# classical, instead of settling for that share (":" would let a client's X25519 share win).
GROUPS = b"X25519MLKEM768/X25519"
# The TLS 1.2 cipher list is unused (TLS 1.3 only), but its "@SECLEVEL" sets the security level
# of the context, the one OpenSSL knob pyOpenSSL reaches: level 2 refuses keys under 112 bits
# (RSA-1024) and SHA-1 signatures. OpenSSL 4 defaults to 2, but an OpenSSL configuration file
# (OPENSSL_CONF, a distribution's legacy crypto policy) can lower the default; this pins it.
SECURITY = b"DEFAULT:@SECLEVEL=2"
_READ = 65536
# The data path calls OpenSSL through pyOpenSSL's cffi binding directly: pyOpenSSL's recv() and
# bio_read() allocate a fresh 64 KiB buffer per call and signal "no more data" by raising
# WantReadError, which together cost more than the AES-GCM work on a small request.
_SSL_read = _ossl.SSL_read
_SSL_write = _ossl.SSL_write
_SSL_get_error = _ossl.SSL_get_error
_BIO_read = _ossl.BIO_read
_BIO_write = _ossl.BIO_write
_BIO_get_mem_data = _ossl.BIO_get_mem_data  # bytes still queued in a memory BIO
_unpack = _ffi.unpack
_WANT_READ = _ossl.SSL_ERROR_WANT_READ
# A TLS 1.3 record of these suites is its plaintext plus 22 bytes (5 header, 1 inner content
# type, 16 tag) unless the sender pads it; OpenSSL does not pad by default.
_AEAD16_SUITES = frozenset(
    ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")
)
_RECORD_OVERHEAD = 22
_ZERO_RETURN = _ossl.SSL_ERROR_ZERO_RETURN
# What an identity may be made of: a DNS name or a URI (RFC 3986 characters). It becomes a
# header line (l5d-client-id), a metrics label and a policy subject, so whitespace and control
# characters (CR LF would add header lines) are refused even in a certificate our CA signed.
_IDENTITY = re.compile(r"[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]{1,1024}")
# ASCII case folding only: str.lower() also folds non-ASCII letters into ASCII ones (KELVIN SIGN
# to "k"), which would let a name that is not the identity match it.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True, slots=True, repr=False)
class MeshCredentials:
    """The local identity's certificate chain (leaf first), PKCS#8 key, and the trust bundle."""

    identity: str
    chain_pem: bytes
    key_pem: bytes
    bundle_pem: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.identity, str) or not self.identity:
            raise ConfigError("identity must be a non-empty string")
        for field in ("chain_pem", "key_pem", "bundle_pem"):
            value = getattr(self, field)
            if not isinstance(value, bytes) or b"-----BEGIN" not in value:
                raise ConfigError(f"{field} must be PEM bytes")
        if b"ENCRYPTED" in self.key_pem:  # PKCS#8 "ENCRYPTED PRIVATE KEY" or legacy Proc-Type
            raise ConfigError(
                "key_pem is an encrypted private key; the proxy needs it unencrypted (mode 0600)"
            )

    def __repr__(self) -> str:  # never show the key
        return f"MeshCredentials({self.identity!r})"


class CredentialSource(Protocol):
    """Where the proxy gets its current credentials (the identity client implements this)."""

    def current(self) -> MeshCredentials | None:
        """The credentials to use for new connections; None before the first certificate."""


class StaticCredentials:
    """A credential source holding one value, replaced with :meth:`update` (tests, files)."""

    def __init__(self, credentials: MeshCredentials | None = None) -> None:
        self._credentials = credentials

    def current(self) -> MeshCredentials | None:
        return self._credentials

    def update(self, credentials: MeshCredentials) -> None:
        self._credentials = credentials


def split_pem_certificates(pem: bytes) -> list[crypto.X509]:
    """Every certificate in a PEM blob, in order."""
    marker = b"-----END CERTIFICATE-----"
    certs = []
    for block in pem.split(marker)[:-1]:
        start = block.find(b"-----BEGIN CERTIFICATE-----")
        if start < 0:
            raise ConfigError("PEM data contains an END CERTIFICATE line without its BEGIN")
        try:
            certs.append(crypto.load_certificate(crypto.FILETYPE_PEM, block[start:] + marker))
        except crypto.Error as e:
            raise ConfigError(f"a PEM certificate does not parse: {e}") from None
    if not certs:
        raise ConfigError("PEM data contains no certificate")
    return certs


def san_identities(cert: x509.Certificate) -> tuple[str, ...]:
    """DNS and URI SANs of ``cert``, in certificate order, as :func:`canonical_identity`."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(
        canonical_identity(g.value) if isinstance(g, x509.DNSName) else g.value
        for g in san
        if isinstance(g, x509.DNSName | x509.UniformResourceIdentifier)
    )


def canonical_identity(identity: str) -> str:
    """``identity`` as certificates are matched against it: a DNS-form name in lower case.

    DNS names compare without regard to ASCII case (RFC 6125 section 6.4.1); a URI (it has a
    scheme, so a ":") is left as it is.
    """
    return identity if ":" in identity else identity.translate(_ASCII_LOWER)


def _set_groups(ctx: SSL.Context) -> None:
    setter = getattr(_ossl, "SSL_CTX_set1_groups_list", None) or getattr(
        _ossl, "SSL_CTX_set1_curves_list", None
    )
    if setter is None or setter(ctx._context, GROUPS) != 1:
        raise TLSError("this OpenSSL cannot set the TLS key-exchange groups")


def _base_context(creds: MeshCredentials, *, server: bool) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    # Frees idle record buffers: ~25 KiB less per held connection.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    _set_groups(ctx)
    ctx.set_cipher_list(SECURITY)  # before the certificates: ours must pass the level too
    chain = split_pem_certificates(creds.chain_pem)
    _refuse_weak_signatures(chain)
    try:
        # A passphrase, so that OpenSSL never asks for one on the controlling terminal.
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, creds.key_pem, passphrase=b"")
    except crypto.Error:
        raise ConfigError("the private key PEM does not parse") from None
    try:
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
    except SSL.Error as e:  # e.g. "ee key too small": the security level applies to ours too
        raise ConfigError(f"the certificate chain cannot be used: {_reason(e)}") from None
    try:
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    except SSL.Error:
        raise ConfigError("the private key does not match the leaf certificate") from None
    store = ctx.get_cert_store()
    assert store is not None
    for anchor in split_pem_certificates(creds.bundle_pem):
        store.add_cert(anchor)
    if server:
        # No resumption (as Linkerd): every connection verifies the peer's certificate against
        # the current bundle, and there is no 0-RTT. NO_TICKET stops the encrypted (stateless)
        # tickets, which OpenSSL then refused to resume with a fatal "session id context
        # uninitialized"; with the cache off, an offered ticket just means a full handshake.
        ctx.set_options(SSL.OP_NO_TICKET)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return ctx


# Digests every peer at security level 2 refuses in a chain ("CA signature digest algorithm too
# weak"). OpenSSL checks them only in the chains it verifies, never in the one it sends.
_WEAK_DIGESTS = frozenset(("sha1", "md5"))


def _refuse_weak_signatures(chain: list[crypto.X509]) -> None:
    """Refuse our own chain when a certificate in it is signed with SHA-1 or MD5: every peer
    would fail the handshake, so such credentials are unusable, like a key that is too small."""
    for position, cert in enumerate(chain):
        try:
            digest = cert.to_cryptography().signature_hash_algorithm
        except UnsupportedAlgorithm:  # not ours to judge: the peers' verification decides
            continue
        if digest is not None and digest.name in _WEAK_DIGESTS:
            which = "the leaf" if position == 0 else f"chain certificate {position}"
            raise ConfigError(
                f"the certificate chain cannot be used: {which} is signed with "
                f"{digest.name.upper()}, which every peer refuses"
            )


@dataclass(frozen=True, slots=True)
class HandshakeInfo:
    """What a completed handshake established."""

    group: str
    peer_identity: str | None
    alpn: bytes | None
    # The peer's certificate NotAfter (seconds since the epoch; inf without a certificate).
    peer_not_after: float = math.inf


class MeshTls:
    """Builds client and server sessions from the credential source's current value."""

    def __init__(self, source: CredentialSource, kex: KexPolicy = KexPolicy.HYBRID_REQUIRED):
        if not isinstance(kex, KexPolicy):
            raise TypeError("kex must be a KexPolicy")
        self.source = source
        self.kex = kex
        self._built_from: MeshCredentials | None = None
        self._unusable: MeshCredentials | None = None  # the last value that failed to load
        self._unusable_reason = ""
        self._server_ctx: SSL.Context | None = None
        self._client_ctx: SSL.Context | None = None
        # One scratch buffer for every session of this proxy: they all run on one event loop.
        self._buffer = _ffi.new("char[]", _READ)
        self._mem = _ffi.new("char **")  # BIO_get_mem_data's out-parameter, never read

    @property
    def credentials(self) -> MeshCredentials:
        creds = self.source.current()
        if creds is None:
            raise TLSError("no certificate yet: the proxy is not ready for mesh TLS")
        if creds is not self._built_from and creds is not self._unusable:
            try:
                server = _base_context(creds, server=True)
                client = _base_context(creds, server=False)
            except ConfigError as e:
                # Keep serving on the last good credentials (the proxy's promise while the
                # control plane misbehaves); say so once per refused value, not per connection.
                self._unusable, self._unusable_reason = creds, str(e)
                log.error("new mesh TLS credentials cannot be used, keeping the last good: %s", e)
            else:
                # Client certificates are optional: unauthenticated clients are for policy.
                server.set_verify(SSL.VERIFY_PEER)
                server.set_alpn_select_callback(_select_alpn)
                client.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
                self._server_ctx, self._client_ctx, self._built_from = server, client, creds
        if self._built_from is None:
            raise TLSError(f"the proxy's credentials cannot be used: {self._unusable_reason}")
        return self._built_from

    def server_session(self) -> TlsSession:
        """A session accepting one inbound mesh connection."""
        self.credentials  # noqa: B018 - rebuilds the contexts when credentials changed
        assert self._server_ctx is not None
        conn = SSL.Connection(self._server_ctx, None)
        conn.set_accept_state()
        return TlsSession(conn, expected=None, kex=self.kex, buffer=self._buffer, mem=self._mem)

    def client_session(self, peer_identity: str, *, alpn: bytes | None = ALPN) -> TlsSession:
        """A session to a peer that must present ``peer_identity`` (also sent as SNI).

        With ``alpn`` (the transport header's protocol by default) the peer must also select
        it: a server that ignores it is not a mesh proxy's inbound, and the transport header
        written to it would reach whatever application it is as data.
        """
        if not _IDENTITY.fullmatch(peer_identity):
            raise TLSError(f"discovery promised {peer_identity!r}: not a valid identity name")
        self.credentials  # noqa: B018
        assert self._client_ctx is not None
        # The server proxy compares the SNI with its own (lower-case) identity.
        expected = canonical_identity(peer_identity)
        conn = SSL.Connection(self._client_ctx, None)
        conn.set_tlsext_host_name(expected.encode("ascii"))
        if alpn is not None:
            conn.set_alpn_protos([alpn])
        conn.set_connect_state()
        session = TlsSession(
            conn, expected=expected, kex=self.kex, buffer=self._buffer, mem=self._mem
        )
        session.require_alpn = alpn
        return session


def control_plane_session(
    anchors: list[crypto.X509], server_name: str, *, kex: KexPolicy, alpn: bytes = b"h2"
) -> TlsSession:
    """A session to a control-plane service (identity, destination) over TLS 1.3.

    No client certificate: the service authenticates the proxy by its token. The service's
    chain must verify against ``anchors`` and carry ``server_name``, and the key exchange
    follows ``kex`` as mesh connections do. ``alpn`` is offered and must be selected.
    """
    if not _IDENTITY.fullmatch(server_name):
        raise ConfigError(f"{server_name!r} is not a valid TLS name for a control-plane service")
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    _set_groups(ctx)
    ctx.set_cipher_list(SECURITY)
    store = ctx.get_cert_store()
    assert store is not None
    for anchor in anchors:
        store.add_cert(anchor)
    ctx.set_verify(SSL.VERIFY_PEER)
    expected = canonical_identity(server_name)
    conn = SSL.Connection(ctx, None)
    conn.set_tlsext_host_name(expected.encode("ascii"))
    conn.set_alpn_protos([alpn])
    conn.set_connect_state()
    session = TlsSession(conn, expected=expected, kex=kex)
    session.require_alpn = alpn
    return session


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    return ALPN if ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]


class TlsSession:
    """One TLS connection over memory BIOs: bytes in, plaintext and bytes-to-send out."""

    __slots__ = (
        "_buf", "_clean", "_conn", "_mem", "_overhead", "_rbio", "_ssl", "_wbio", "closed",
        "expected", "info", "kex", "require_alpn",
    )  # fmt: skip

    def __init__(
        self,
        conn: SSL.Connection,
        *,
        expected: str | None,
        kex: KexPolicy,
        buffer: object = None,
        mem: object = None,
    ) -> None:
        self._conn = conn
        # pyOpenSSL's own pointers; ``conn`` stays referenced, so they live as long as we do.
        self._ssl = conn._ssl
        self._rbio = conn._into_ssl
        self._wbio = conn._from_ssl
        self._buf = buffer if buffer is not None else _ffi.new("char[]", _READ)
        self._mem = mem if mem is not None else _ffi.new("char **")
        self.expected = expected
        self.kex = kex
        self.require_alpn: bytes | None = None  # a client's: the protocol the peer must select
        self.info: HandshakeInfo | None = None
        self.closed = False  # the peer sent close_notify
        # Once the handshake is done: the size of an unpadded record beyond its plaintext (0:
        # unknown), and whether every byte fed so far has been read out as whole records
        # (with read-ahead off, OpenSSL's default, a read takes exactly one record's bytes).
        self._overhead = 0
        self._clean = False

    def start(self) -> bytes:
        """Begin the handshake; for a client this returns the ClientHello."""
        return self._handshake()

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Take bytes from the socket; return (plaintext for the application, bytes to send).

        Raises :class:`TLSError` (or a subclass) when the handshake or a record fails.
        """
        if data:
            _BIO_write(self._rbio, data, len(data))  # a memory BIO takes everything
        out = b""
        if self.info is None:
            out = self._handshake()
            if self.info is None:
                return b"", out
        # Inlined: this runs for every record received.
        ssl, buf = self._ssl, self._buf
        n = _SSL_read(ssl, buf, _READ)
        if n > 0:
            plaintext = _unpack(buf, n)
            # The usual read: ``data`` was exactly one unpadded application-data record and
            # nothing was pending before it, so nothing is left to read, and reading one
            # application record sends nothing back.
            if self._clean and len(data) == n + self._overhead:
                return plaintext, out
            # One read returns a whole record (the buffer outsizes any record): with no input
            # left in the BIO, a second read could only say "want more" (measured ~0.5 µs).
            if _BIO_get_mem_data(self._rbio, self._mem) > 0:
                self._clean = False  # a partial record may stay behind
                n = _SSL_read(ssl, buf, _READ)
                if n > 0:
                    plaintext, n = self._read_rest(plaintext, n)
                if _SSL_get_error(ssl, n) != _WANT_READ:
                    self._read_ended(n)
            else:
                self._clean = self._overhead > 0
        else:
            plaintext = b""
            self._clean = False
            if _SSL_get_error(ssl, n) != _WANT_READ:
                self._read_ended(n)
        n = _BIO_read(self._wbio, buf, _READ)  # e.g. an answer to a KeyUpdate
        if n <= 0:
            return plaintext, out
        pending = _unpack(buf, n) if n < _READ else self._drain_rest()
        return plaintext, out + pending

    def _read_rest(self, first: bytes, n: int) -> tuple[bytes, int]:
        ssl, buf = self._ssl, self._buf
        chunks = [first]
        while n > 0:
            chunks.append(_unpack(buf, n))
            n = _SSL_read(ssl, buf, _READ)
        return b"".join(chunks), n

    def _read_ended(self, result: int) -> None:
        error = _SSL_get_error(self._ssl, result)
        if error == _WANT_READ:
            return
        if error == _ZERO_RETURN:
            self.closed = True
            return
        raise TLSError(f"TLS record error: {self._error_reason(result)}")

    def _error_reason(self, result: int) -> str:
        # pyOpenSSL turns OpenSSL's error queue into an exception (and clears the queue).
        try:
            self._conn._raise_ssl_error(self._ssl, result)
        except SSL.Error as e:
            return _reason(e)
        return "unknown"

    def encrypt(self, plaintext: bytes) -> bytes:
        """Encrypt application data; returns the records to write."""
        left = len(plaintext)
        if left:
            n = _SSL_write(self._ssl, plaintext, left)
            if n != left:  # a memory BIO never makes OpenSSL write partially; be safe anyway
                self._write_rest(plaintext, n)
        buf = self._buf
        n = _BIO_read(self._wbio, buf, _READ)
        if n <= 0:
            return b""
        return _unpack(buf, n) if n < _READ else self._drain_rest()

    def _write_rest(self, plaintext: bytes, n: int) -> None:
        view = memoryview(plaintext)
        while True:
            if n <= 0:
                raise TLSError(f"TLS write failed: {self._error_reason(n)}")
            view = view[n:]
            if not view:
                return
            with _ffi.from_buffer(view) as data:
                n = _SSL_write(self._ssl, data, len(view))

    def close_notify(self) -> bytes:
        """The close_notify alert, telling the peer no more data follows (a TLS half-close)."""
        try:
            self._conn.shutdown()
        except SSL.Error:
            return b""
        return self.drain()

    def drain(self) -> bytes:
        """Every byte the session has queued for the peer."""
        buf = self._buf
        n = _BIO_read(self._wbio, buf, _READ)
        if n <= 0:
            return b""
        return _unpack(buf, n) if n < _READ else self._drain_rest()

    def _drain_rest(self) -> bytes:
        """The scratch buffer holds a full first chunk: collect it and whatever follows."""
        wbio, buf = self._wbio, self._buf
        parts = [_unpack(buf, _READ)]
        n = _READ
        while n == _READ:
            n = _BIO_read(wbio, buf, _READ)
            if n > 0:
                parts.append(_unpack(buf, n))
        return b"".join(parts)

    def _handshake(self) -> bytes:
        conn = self._conn
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            return self.drain()
        except SSL.Error as e:
            # Our alert, if any, stays queued: the driver drains and sends it before closing.
            reason = _reason(e)
            # "certificate verify failed" alone hides why: expired, unknown anchor, not a CA...
            verify = _ossl.SSL_get_verify_result(self._ssl)
            if verify != _ossl.X509_V_OK:
                detail = _ffi.string(_ossl.X509_verify_cert_error_string(verify)).decode()
                reason = f"{reason}: {detail}"
            raise TLSError(f"TLS handshake failed: {reason}") from None
        out = self.drain()
        self.info = self._check()
        if conn.get_cipher_name() in _AEAD16_SUITES:
            self._overhead = _RECORD_OVERHEAD
        return out

    def _check(self) -> HandshakeInfo:
        conn = self._conn
        group = conn.get_group_name() or "unknown"
        alpn = conn.get_alpn_proto_negotiated() or None
        peer = conn.get_peer_certificate(as_cryptography=True)
        names = san_identities(peer) if peer is not None else ()
        if self.expected is not None and self.expected not in names:
            raise PeerIdentityMismatch(
                f"the peer presented {', '.join(names) or 'no identity'}, "
                f"not the expected {self.expected}"
            )
        if self.kex is KexPolicy.HYBRID_REQUIRED and group != HYBRID_GROUP:
            raise KexRefused(f"the handshake negotiated {group}, and {HYBRID_GROUP} is required")
        if self.require_alpn is not None and alpn != self.require_alpn:
            why = ": it is not a mesh proxy's inbound port" if self.require_alpn == ALPN else ""
            raise AlpnRefused(
                f"peer {self.expected} did not negotiate ALPN {self.require_alpn.decode()}{why}"
            )
        identity = self.expected if self.expected is not None else (names[0] if names else None)
        if identity is not None and not _IDENTITY.fullmatch(identity):
            raise TLSError(f"the peer's certificate names {identity!r}: not a valid identity name")
        not_after = peer.not_valid_after_utc.timestamp() if peer is not None else math.inf
        return HandshakeInfo(group, identity, alpn, not_after)

    @property
    def group(self) -> str | None:
        """The negotiated group even when the handshake was then refused (for metrics)."""
        try:
            return self._conn.get_group_name()
        except SSL.Error:
            return None


def _reason(e: SSL.Error) -> str:
    try:
        return "; ".join(str(part[2]) for part in e.args[0]) or "unknown"
    except (IndexError, TypeError):
        return str(e) or type(e).__name__
