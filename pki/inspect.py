"""Inspection: what a certificate, a chain, a store or a live TLS endpoint holds, as plain data.

Every ``describe_*`` function returns frozen dataclasses with a ``to_dict()`` that is ready for
``json.dumps``; rendering for people (tables, colours) belongs to the CLI. Times are relative to
the ``now`` the caller passes. :func:`probe_endpoint` does a real TLS 1.3 handshake with pyOpenSSL
on the OpenSSL 4 bundled with cryptography, so the negotiated key-exchange group (e.g.
``X25519MLKEM768``) is reported as the server actually chose it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto

from pki.bundle import TrustBundle
from pki.certs import Certificate, Credential, load_pem_chain
from pki.errors import CertificateParseError, EndpointError, PKIError, VerificationError
from pki.keys import KeyAlgorithm
from pki.renewal import RenewalPolicy, decide
from pki.rotation import next_issuer_lifetime
from pki.store import FileStore
from pki.verify import verify_chain

DEFAULT_TIMEOUT = 10.0
CLOSE_GRACE = 1.0  # how long to wait for the server's close_notify after ours


def _iso(t: datetime) -> str:
    return t.isoformat()


def _status(cert: Certificate, now: datetime) -> str:
    if now < cert.not_before:
        return "not-yet-valid"
    if now > cert.not_after:
        return "expired"
    return "valid"


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """The facts about one certificate that people and alerts ask for."""

    subject: str
    issuer: str
    serial: str
    fingerprint: str
    not_before: datetime
    not_after: datetime
    remaining: timedelta
    status: str
    key_algorithm: str
    signature_algorithm: str
    is_ca: bool
    path_length: int | None
    self_signed: bool
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "fingerprint_sha256": self.fingerprint,
            "not_before": _iso(self.not_before),
            "not_after": _iso(self.not_after),
            "remaining_seconds": int(self.remaining.total_seconds()),
            "status": self.status,
            "key_algorithm": self.key_algorithm,
            "signature_algorithm": self.signature_algorithm,
            "is_ca": self.is_ca,
            "path_length": self.path_length,
            "self_signed": self.self_signed,
            "dns_names": list(self.dns_names),
            "uris": list(self.uris),
        }


def describe_certificate(cert: Certificate, now: datetime) -> CertificateInfo:
    try:
        key_algorithm = cert.key_algorithm.value
    except PKIError:
        key_algorithm = type(cert.x509.public_key()).__name__
    return CertificateInfo(
        subject=cert.subject,
        issuer=cert.issuer,
        serial=f"{cert.serial:x}",
        fingerprint=cert.fingerprint,
        not_before=cert.not_before,
        not_after=cert.not_after,
        remaining=cert.not_after - now,
        status=_status(cert, now),
        key_algorithm=key_algorithm,
        signature_algorithm=cert.signature_algorithm,
        is_ca=cert.is_ca,
        path_length=cert.path_length,
        self_signed=cert.is_self_signed,
        dns_names=cert.dns_names,
        uris=cert.uris,
    )


@dataclass(frozen=True, slots=True)
class ChainInfo:
    """Certificates in file (or wire) order, with the chain's earliest expiry."""

    certificates: tuple[CertificateInfo, ...]
    expires: datetime
    verified: bool | None  # None: not checked against a bundle
    verify_error: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "certificates": [c.to_dict() for c in self.certificates],
            "expires": _iso(self.expires),
            "verified": self.verified,
            "verify_error": self.verify_error,
        }


def _verify(
    certs: Sequence[Certificate], bundle: TrustBundle | None, now: datetime
) -> tuple[bool | None, str | None]:
    if bundle is None or not certs:
        return None, None
    try:
        verify_chain(certs[0], certs[1:], bundle, at=now)
    except VerificationError as e:
        return False, f"{type(e).__name__}: {e}"
    return True, None


def describe_chain(
    certs: Sequence[Certificate], now: datetime, *, bundle: TrustBundle | None = None
) -> ChainInfo:
    """Describe ``certs`` (leaf first); with ``bundle``, also verify the chain at ``now``."""
    if not certs:
        raise CertificateParseError("there is no certificate to describe")
    verified, error = _verify(certs, bundle, now)
    return ChainInfo(
        certificates=tuple(describe_certificate(c, now) for c in certs),
        expires=min(c.not_after for c in certs),
        verified=verified,
        verify_error=error,
    )


def load_certificates(data: bytes) -> tuple[Certificate, ...]:
    """Certificates from a PEM bundle (any number) or one DER certificate."""
    if b"-----BEGIN" in data:
        return load_pem_chain(data)
    return (Certificate.from_der(data),)


# --- stores ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreInfo:
    """A FileStore's current version: anchors, bundle digest, issuer and its renewal point."""

    root: str
    version: int
    created: str
    reason: str
    versions: int
    bundle_digest: str | None
    anchors: tuple[CertificateInfo, ...]
    signing_anchor: str | None  # fingerprint of the anchor whose key is in the store
    anchor_key_present: bool
    issuer: ChainInfo | None
    renewal_action: str | None
    renew_at: datetime | None
    staged_anchor: str | None = None  # in the bundle, waiting for 'pki anchor activate'
    next_issuer_lifetime: timedelta | None = None  # what a renewal asks for (issuer.json)
    pending_issuer_key: str | None = None  # algorithm of the key an issuer CSR is out for
    pending_issuer_key_since: datetime | None = None  # when that key was made (store versions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "version": self.version,
            "created": self.created,
            "reason": self.reason,
            "versions": self.versions,
            "bundle_digest": self.bundle_digest,
            "anchors": [a.to_dict() for a in self.anchors],
            "signing_anchor": self.signing_anchor,
            "anchor_key_present": self.anchor_key_present,
            "staged_anchor": self.staged_anchor,
            "issuer": self.issuer.to_dict() if self.issuer else None,
            "renewal": None
            if self.renew_at is None
            else {"action": self.renewal_action, "renew_at": _iso(self.renew_at)},
            "next_issuer_lifetime_seconds": None
            if self.next_issuer_lifetime is None
            else int(self.next_issuer_lifetime.total_seconds()),
            "pending_issuer_key": self.pending_issuer_key,
            "pending_issuer_key_since": None
            if self.pending_issuer_key_since is None
            else _iso(self.pending_issuer_key_since),
        }


def describe_store(
    store: FileStore, now: datetime, *, policy: RenewalPolicy | None = None
) -> StoreInfo:
    """Describe the store's current version; the issuer is verified against its bundle."""
    state = store.load()
    bundle = state.bundle
    issuer_info = None
    action: str | None = None
    renew_at: datetime | None = None
    if state.issuer is not None:
        issuer_info = describe_chain(state.issuer.full_chain, now, bundle=bundle)
        decision = decide(
            state.issuer.certificate,
            policy or RenewalPolicy(),
            now,
            not_after=state.issuer.expires,
        )
        action, renew_at = decision.action.value, decision.renew_at
    return StoreInfo(
        root=str(store.root),
        version=state.version,
        created=state.created,
        reason=state.reason,
        versions=len(store.versions()),
        bundle_digest=bundle.digest if bundle else None,
        anchors=tuple(describe_certificate(a, now) for a in bundle.anchors) if bundle else (),
        signing_anchor=state.anchor.fingerprint if state.anchor else None,
        anchor_key_present=state.anchor_key is not None,
        issuer=issuer_info,
        renewal_action=action,
        renew_at=renew_at,
        staged_anchor=state.next_anchor.fingerprint if state.next_anchor else None,
        next_issuer_lifetime=next_issuer_lifetime(state) if state.issuer is not None else None,
        pending_issuer_key=(
            state.pending_issuer_key.algorithm.value if state.pending_issuer_key else None
        ),
        pending_issuer_key_since=(
            store.pending_issuer_key_since() if state.pending_issuer_key else None
        ),
    )


# --- live endpoints --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("endpoint host is empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"endpoint port {self.port} is not in 1..65535")

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_ENDPOINT = re.compile(
    r"\[(?P<v6>[0-9a-fA-F:.]+)\]:(?P<p6>\d{1,5})|(?P<host>[A-Za-z0-9._-]+):(?P<port>\d{1,5})"
)


def parse_endpoint(text: str) -> Endpoint | None:
    """``host:port`` or ``[v6]:port`` as an :class:`Endpoint`; None if ``text`` is not one."""
    m = _ENDPOINT.fullmatch(text.strip())
    if m is None:
        return None
    host, port = (m["v6"], m["p6"]) if m["v6"] else (m["host"], m["port"])
    if not 0 < int(port) < 65536:
        return None
    return Endpoint(host, int(port))


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """What a TLS server presented and negotiated."""

    endpoint: str
    server_name: str | None
    protocol: str
    cipher: str
    group: str | None
    client_certificate: str | None  # subject of the certificate offered to the server
    chain: ChainInfo

    def to_dict(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "server_name": self.server_name,
            "protocol": self.protocol,
            "cipher": self.cipher,
            "group": self.group,
            "client_certificate": self.client_certificate,
            "chain": self.chain.to_dict(),
        }


def _client_context(client: Credential | None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    # Inspection reports whatever the server presents; trust is judged by pki.verify against a
    # bundle afterwards, with typed errors, instead of failing the handshake.
    ctx.set_verify(SSL.VERIFY_NONE, lambda *args: True)
    if client is not None:
        ctx.use_certificate(client.certificate.x509)
        if client.key.algorithm is KeyAlgorithm.ECDSA_P256:
            ctx.use_privatekey(client.key.key)  # type: ignore[arg-type]
        else:
            # pyOpenSSL cannot wrap an ML-DSA key object, but loads any key OpenSSL 4 reads.
            ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, client.key.to_pem()))
        for cert in client.chain:
            ctx.add_extra_chain_cert(cert.x509)
    return ctx


def _handshake(conn: SSL.Connection, sock: socket.socket, deadline: float) -> None:
    """Drive a memory-BIO handshake over ``sock`` until done or ``deadline`` passes."""
    while True:
        try:
            conn.do_handshake()
            done = True
        except SSL.WantReadError:
            done = False
        except SSL.Error as e:
            raise EndpointError(f"TLS handshake failed: {e}") from None
        out = _drain(conn)
        if out:
            sock.sendall(out)
        if done:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise EndpointError("TLS handshake timed out")
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            raise EndpointError("TLS handshake timed out") from None
        if not data:
            raise EndpointError("the server closed the connection during the TLS handshake")
        conn.bio_write(data)


def _close(conn: SSL.Connection, sock: socket.socket, deadline: float) -> None:
    """Send close_notify and read until the server's, so the server finishes its side cleanly
    (a TLS 1.3 server writes session tickets after the handshake; an abrupt close breaks them)."""
    try:
        conn.shutdown()
        sock.sendall(_drain(conn))
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            data = sock.recv(65536)
            if not data:
                return
            conn.bio_write(data)
            try:
                while conn.recv(65536):
                    pass
            except SSL.WantReadError:
                continue
    except (SSL.Error, OSError):
        return  # the server closed first, or not at all: nothing more to learn


def _drain(conn: SSL.Connection) -> bytes:
    chunks = []
    while True:
        try:
            chunk = conn.bio_read(65536)
        except SSL.WantReadError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def probe_endpoint(
    endpoint: Endpoint,
    *,
    now: datetime,
    timeout: float = DEFAULT_TIMEOUT,
    server_name: str | None = None,
    client: Credential | None = None,
    bundle: TrustBundle | None = None,
) -> EndpointInfo:
    """Handshake with ``endpoint`` (TLS 1.3) and describe what it presented and negotiated.

    ``server_name`` is sent as SNI (default: the host, unless it is an IP address); ``client``
    is presented when the server asks for a certificate; with ``bundle`` the presented chain is
    verified at ``now``. The client offers OpenSSL 4's default groups, X25519MLKEM768 first.
    """
    if server_name is None:
        try:
            ipaddress.ip_address(endpoint.host)
        except ValueError:
            server_name = endpoint.host
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except OSError as e:
        raise EndpointError(f"cannot connect to {endpoint}: {e.strerror or e}") from None
    try:
        conn = SSL.Connection(_client_context(client), None)
        conn.set_connect_state()
        if server_name:
            conn.set_tlsext_host_name(server_name.encode("idna"))
        try:
            _handshake(conn, sock, deadline)
        except OSError as e:
            raise EndpointError(f"connection to {endpoint} failed: {e.strerror or e}") from None
        presented = conn.get_peer_cert_chain(as_cryptography=True) or []
        _close(conn, sock, min(deadline, time.monotonic() + CLOSE_GRACE))
        chain = tuple(Certificate.from_x509(c) for c in presented)
        if not chain:
            raise EndpointError(f"{endpoint} presented no certificate")
        return EndpointInfo(
            endpoint=str(endpoint),
            server_name=server_name,
            protocol=conn.get_protocol_version_name(),
            cipher=conn.get_cipher_name() or "",
            group=conn.get_group_name(),
            client_certificate=client.certificate.subject if client else None,
            chain=describe_chain(chain, now, bundle=bundle),
        )
    finally:
        sock.close()


def read_target(path: Path) -> bytes:
    """Read a certificate file with a clear error (a helper for the CLI's file targets)."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise CertificateParseError(f"cannot read {path}: {e.strerror}") from None
