"""Shared pki test material: real chains (ECDSA and ML-DSA) and a real TLS 1.3 server."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from pki.bundle import TrustBundle
from pki.certs import (
    Certificate,
    Credential,
    create_anchor,
    create_issuer,
    issue_identity,
    utcnow,
)
from pki.keys import KeyAlgorithm, PrivateKey
from pki.names import Identity

# Every test works at explicit times around this instant.
T0 = datetime(2030, 1, 1, tzinfo=UTC)
WEB = Identity("web", "default")


def hand_built_issuer(
    anchor: Credential,
    *,
    not_before: datetime,
    not_after: datetime,
    key_cert_sign: bool = True,
    name: str = "hand-built issuer",
) -> Credential:
    """An intermediate CA made with CertificateBuilder directly, past pki.certs' own rules (its
    window is not clamped to the anchor's, its key usage is as given): the issuers that come
    from outside (cert-manager, another tool) and that the checks must cope with."""
    key = PrivateKey.generate()
    public = key.key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(anchor.certificate.x509.subject)
        .public_key(public)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, key_cert_sign, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)  # type: ignore[arg-type]
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(anchor.key.key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(anchor.key.key, anchor.key.algorithm.signature_hash())  # type: ignore[arg-type]
    )
    return Credential(Certificate.from_x509(cert), key)


@dataclass(frozen=True)
class Chain:
    anchor: Credential
    issuer: Credential
    leaf: Credential
    bundle: TrustBundle


def build_chain(algorithm: KeyAlgorithm, now: datetime = T0) -> Chain:
    anchor_key = PrivateKey.generate(algorithm)
    anchor = Credential(
        create_anchor(anchor_key, now=now, lifetime=timedelta(days=365)), anchor_key
    )
    issuer = create_issuer(
        PrivateKey.generate(algorithm), anchor, now=now, lifetime=timedelta(days=2)
    )
    leaf = issue_identity(WEB, PrivateKey.generate(algorithm), issuer, now=now)
    return Chain(anchor, issuer, leaf, TrustBundle((anchor.certificate,)))


_CHAINS: dict[KeyAlgorithm, Chain] = {}


@pytest.fixture(params=list(KeyAlgorithm), ids=lambda a: a.value)
def chain(request: pytest.FixtureRequest) -> Chain:
    """One chain per algorithm, built once per session (ML-DSA keys are slow-ish to make)."""
    algorithm: KeyAlgorithm = request.param
    if algorithm not in _CHAINS:
        _CHAINS[algorithm] = build_chain(algorithm)
    return _CHAINS[algorithm]


@pytest.fixture
def ecdsa_chain() -> Chain:
    if KeyAlgorithm.ECDSA_P256 not in _CHAINS:
        _CHAINS[KeyAlgorithm.ECDSA_P256] = build_chain(KeyAlgorithm.ECDSA_P256)
    return _CHAINS[KeyAlgorithm.ECDSA_P256]


@pytest.fixture
def mldsa_chain() -> Chain:
    if KeyAlgorithm.ML_DSA_65 not in _CHAINS:
        _CHAINS[KeyAlgorithm.ML_DSA_65] = build_chain(KeyAlgorithm.ML_DSA_65)
    return _CHAINS[KeyAlgorithm.ML_DSA_65]


@pytest.fixture(scope="session")
def live_mldsa_chain() -> Chain:
    """An ML-DSA chain valid at the real current time, for peers (OpenSSL) that use the clock."""
    return build_chain(KeyAlgorithm.ML_DSA_65, utcnow())


def server_context(credential: Credential, client_ca: TrustBundle | None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate(credential.certificate.x509)
    ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, credential.key.to_pem()))
    for cert in credential.chain:
        ctx.add_extra_chain_cert(cert.x509)
    if client_ca is not None:
        for anchor in client_ca.anchors:
            ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(anchor.x509))  # type: ignore[union-attr]
        ctx.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            lambda conn, cert, err, depth, ok: bool(ok),
        )
    return ctx


@dataclass
class TLSServer:
    port: int
    client_certs: list[list[str]] = field(default_factory=list)  # per connection, client chain
    errors: list[str] = field(default_factory=list)
    _handled: threading.Condition = field(default_factory=threading.Condition)

    def connection_done(self) -> None:
        with self._handled:
            self._handled.notify_all()

    def wait_for(self, connections: int, timeout: float = 5.0) -> None:
        """Block until the server has finished ``connections`` connections."""
        with self._handled:
            ok = self._handled.wait_for(
                lambda: len(self.client_certs) + len(self.errors) >= connections, timeout
            )
        assert ok, f"server handled {len(self.client_certs) + len(self.errors)} connections"


@contextlib.contextmanager
def serve_tls(
    credential: Credential, *, client_ca: TrustBundle | None = None
) -> Iterator[TLSServer]:
    """A real pyOpenSSL TLS 1.3 server on 127.0.0.1:0 presenting ``credential``; stopped on exit."""
    ctx = server_context(credential, client_ca)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    server = TLSServer(listener.getsockname()[1])
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            # Blocking socket (pyOpenSSL needs one) with a kernel receive timeout, so a
            # silent client cannot hang the server thread.
            sock.setblocking(True)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
            conn = SSL.Connection(ctx, sock)
            conn.set_accept_state()
            try:
                conn.do_handshake()
                # TLS 1.3: the client's Finished (and certificate) arrives after the
                # server's flight; a read completes the server side of the handshake.
                try:
                    conn.recv(1)
                except (SSL.ZeroReturnError, SSL.SysCallError, SSL.WantReadError):
                    pass
                # server side, OpenSSL's peer chain omits the client's own certificate
                leaf = conn.get_peer_certificate(as_cryptography=True)
                rest = conn.get_peer_cert_chain(as_cryptography=True) or []
                peer = [leaf, *rest] if leaf is not None else []
                server.client_certs.append([c.subject.rfc4514_string() for c in peer])
            except (SSL.Error, OSError) as e:
                server.errors.append(repr(e))
            finally:
                sock.close()
                server.connection_done()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.fixture
def tls_server() -> Iterator[Callable[..., TLSServer]]:
    """Start real TLS servers (see :func:`serve_tls`) that are stopped at teardown."""
    with contextlib.ExitStack() as stack:

        def start(credential: Credential, *, client_ca: TrustBundle | None = None) -> TLSServer:
            return stack.enter_context(serve_tls(credential, client_ca=client_ca))

        yield start
