"""Mesh TLS against forged and malformed peer certificates, on both sides of a real TLS 1.3
handshake: the client proxy checking a server, the server proxy checking a client.

The certificates are built here with cryptography's X.509 builder and signed by the test PKI's
real issuer (or by keys that must not be trusted), to cover what the identity service never
issues: wrong validity, wrong chain, wrong extensions, wrong names."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from proxy_mesh import raw_exchange, run_mesh
from test_meshtls import pump

from pki.certs import Certificate
from pki.keys import PrivateKey
from proxy.errors import PeerIdentityMismatch, TLSError
from proxy.meshtls import MeshCredentials, MeshTls, StaticCredentials

pytestmark = pytest.mark.timeout(30)

DOMAIN = "default.serviceaccount.identity.trustmesh.cluster.local"
WEB, API = f"web.{DOMAIN}", f"api.{DOMAIN}"
SERVER_AUTH, CLIENT_AUTH = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH


@dataclass(frozen=True)
class Spec:
    """How to build one certificate; the defaults make a valid workload leaf."""

    sans: tuple[str, ...] | None = None  # None: the identity; () no SAN extension
    ca: bool | None = False  # None: no basicConstraints
    path_length: int | None = None
    key_cert_sign: bool = False
    eku: tuple[x509.ObjectIdentifier, ...] | None = (SERVER_AUTH, CLIENT_AUTH)
    not_before: timedelta = timedelta(minutes=-5)  # from now
    not_after: timedelta = timedelta(hours=1)


def build(
    spec: Spec,
    cn: str,
    key: PrivateKey,
    signer: PrivateKey,
    issuer: x509.Name,
    aki_key: object = None,  # the key the AKI names (default: the signer's)
) -> x509.Certificate:
    now = datetime.now(UTC)  # OpenSSL verifies against the wall clock
    pub = key.public_key()
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + spec.not_before)
        .not_valid_after(now + spec.not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(aki_key or signer.public_key()),
            critical=False,
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=spec.key_cert_sign,
                crl_sign=spec.key_cert_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    sans = (cn,) if spec.sans is None else spec.sans
    if sans:
        names = [x509.UniformResourceIdentifier(s) if "://" in s else x509.DNSName(s) for s in sans]
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if spec.ca is not None:
        b = b.add_extension(
            x509.BasicConstraints(ca=spec.ca, path_length=spec.path_length), critical=True
        )
    if spec.eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(list(spec.eku)), critical=False)
    return b.sign(signer.key, signer.algorithm.signature_hash())


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(Certificate(b"", c).pem for c in certs)


def forged(pki: Any, identity: str, spec: Spec = Spec()) -> MeshCredentials:
    """Credentials for ``identity`` whose leaf the PKI's issuer signed as ``spec`` says."""
    key = PrivateKey.generate()
    issuer = pki.issuer.certificate.x509
    leaf = build(spec, identity, key, pki.issuer.key, issuer.subject)
    return MeshCredentials(identity, pem(leaf, issuer), key.to_pem(), pki.bundle.pem())


def under(pki: Any, identity: str, middle: Spec) -> MeshCredentials:
    """Credentials whose valid-looking leaf is signed by a certificate built as ``middle``
    (itself signed by the PKI's issuer): leaf <- middle <- issuer <- anchor."""
    mkey, key = PrivateKey.generate(), PrivateKey.generate()
    issuer = pki.issuer.certificate.x509
    mid = build(middle, "middle", mkey, pki.issuer.key, issuer.subject)
    leaf = build(Spec(), identity, key, mkey, mid.subject)
    return MeshCredentials(identity, pem(leaf, mid, issuer), key.to_pem(), pki.bundle.pem())


def self_signed(pki: Any, identity: str, spec: Spec) -> MeshCredentials:
    key = PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)])
    leaf = build(spec, identity, key, key, name)
    return MeshCredentials(identity, pem(leaf), key.to_pem(), pki.bundle.pem())


def handshake(client: MeshCredentials, server: MeshCredentials, expect: str = API) -> tuple:
    c = MeshTls(StaticCredentials(client)).client_session(expect)
    s = MeshTls(StaticCredentials(server)).server_session()
    pump(c, s)
    return c.info, s.info


# Certificates no proxy may accept from a peer, whichever side presents them, and the reason
# OpenSSL's verifier gives (part of the error, so the test shows why each one failed).
UNTRUSTED: dict[str, tuple[Callable[[Any, str], MeshCredentials], str]] = {
    "expired": (
        lambda pki, ident: forged(
            pki, ident, Spec(not_before=timedelta(days=-2), not_after=timedelta(days=-1))
        ),
        "certificate has expired",
    ),
    "not yet valid": (
        lambda pki, ident: forged(
            pki, ident, Spec(not_before=timedelta(days=1), not_after=timedelta(days=2))
        ),
        "certificate is not yet valid",
    ),
    "self-signed": (
        lambda pki, ident: self_signed(pki, ident, Spec()),
        "self-signed certificate",
    ),
    "self-signed CA": (
        lambda pki, ident: self_signed(pki, ident, Spec(ca=True, key_cert_sign=True)),
        "self-signed certificate",
    ),
    "signed by a leaf (CA:false)": (
        lambda pki, ident: under(pki, ident, Spec(ca=False)),
        "invalid CA certificate",
    ),
    "signed by a cert without basicConstraints": (
        lambda pki, ident: under(pki, ident, Spec(ca=None, key_cert_sign=True, eku=None)),
        "invalid CA certificate",
    ),
    "issuer path length exceeded": (
        lambda pki, ident: under(pki, ident, Spec(ca=True, key_cert_sign=True, eku=None)),
        "path length constraint exceeded",
    ),
}


@pytest.mark.parametrize("case", list(UNTRUSTED))
def test_client_refuses_an_untrusted_server_certificate(pki, case) -> None:
    make, reason = UNTRUSTED[case]
    with pytest.raises(TLSError, match=f"certificate verify failed: {reason}"):
        handshake(pki.credentials("web"), make(pki, API))


@pytest.mark.parametrize("case", list(UNTRUSTED))
def test_server_refuses_an_untrusted_client_certificate(pki, case) -> None:
    """An invalid client certificate fails the handshake: it is never taken for an
    unauthenticated client (that is only a client with no certificate at all)."""
    make, reason = UNTRUSTED[case]
    with pytest.raises(TLSError, match=f"certificate verify failed: {reason}"):
        handshake(make(pki, WEB), pki.credentials("api"))


def test_a_chain_to_another_anchor_is_refused_even_with_our_issuer_name(pki, other_pki) -> None:
    """A leaf from another PKI's issuer, and a leaf signed by another key that borrows our
    issuer's name and key identifier, are refused."""
    foreign = other_pki.credentials("api")
    foreign = replace(foreign, bundle_pem=pki.bundle.pem())
    unknown = "certificate verify failed: unable to get local issuer certificate"
    with pytest.raises(TLSError, match=unknown):
        handshake(pki.credentials("web"), foreign)
    impostor_key, key = PrivateKey.generate(), PrivateKey.generate()
    issuer = pki.issuer.certificate.x509
    leaf = build(Spec(), WEB, key, impostor_key, issuer.subject, issuer.public_key())
    impostor = MeshCredentials(WEB, pem(leaf, issuer), key.to_pem(), pki.bundle.pem())
    with pytest.raises(TLSError, match="certificate verify failed: certificate signature failure"):
        handshake(impostor, pki.credentials("api"))


def test_extended_key_usage_is_enforced_per_side(pki) -> None:
    """Workload leaves carry serverAuth and clientAuth. A server leaf without serverAuth and a
    client leaf without clientAuth are refused (OpenSSL's ssl_server/ssl_client purposes); a
    leaf with no EKU extension at all is accepted for both, as RFC 5280 and Linkerd's webpki
    verifier accept it."""
    web, api = pki.credentials("web"), pki.credentials("api")
    purpose = "certificate verify failed: unsuitable certificate purpose"
    with pytest.raises(TLSError, match=purpose):
        handshake(web, forged(pki, API, Spec(eku=(CLIENT_AUTH,))))
    with pytest.raises(TLSError, match=purpose):
        handshake(forged(pki, WEB, Spec(eku=(SERVER_AUTH,))), api)
    c, s = handshake(forged(pki, WEB, Spec(eku=None)), forged(pki, API, Spec(eku=None)))
    assert c.peer_identity == API and s.peer_identity == WEB


@pytest.mark.parametrize(
    "sans",
    [
        (),  # the identity only in the CN
        (f"*.{DOMAIN}",),
        (API + ".",),
        (f"api.{DOMAIN}.evil.example",),
        ("spiffe://cluster.local/ns/default/sa/api",),
    ],
    ids=["cn-only", "wildcard", "trailing-dot", "suffix", "spiffe-only"],
)
def test_client_requires_the_exact_identity_in_a_san(pki, sans) -> None:
    """Only a DNS SAN equal to the promised identity (ASCII case aside, see
    test_meshtls_hardening) or an equal URI SAN will do: not the CN, not a wildcard, not a
    trailing-dot variant, not a longer name."""
    with pytest.raises(PeerIdentityMismatch, match=f"not the expected {API}"):
        handshake(pki.credentials("web"), forged(pki, API, Spec(sans=sans)))


def test_client_accepts_the_identity_among_several_sans(pki) -> None:
    """As Linkerd's verifier: any SAN equal to the expected identity suffices."""
    c, _ = handshake(pki.credentials("web"), forged(pki, API, Spec(sans=(f"db.{DOMAIN}", API))))
    assert c.peer_identity == API


def test_server_takes_the_first_san_as_the_client_identity(pki) -> None:
    """Linkerd's rule: the first DNS/URI SAN. No SAN (a CN only) means an authenticated
    connection without an identity, which policy treats as unauthenticated."""
    api = pki.credentials("api")
    _, s = handshake(forged(pki, WEB, Spec(sans=(f"db.{DOMAIN}", WEB))), api)
    assert s.peer_identity == f"db.{DOMAIN}"
    _, s = handshake(forged(pki, WEB, Spec(sans=())), api)
    assert s.peer_identity is None


def test_removing_an_anchor_fails_new_connections_and_keeps_live_ones(pki, other_pki) -> None:
    """When the trust bundle loses the anchor a peer chains to, new handshakes with that peer
    fail while the connection already up keeps working (contexts are per credentials value)."""
    web = pki.credentials("web")
    source = StaticCredentials(web)
    tls = MeshTls(source)
    server_tls = MeshTls(StaticCredentials(pki.credentials("api")))
    live, live_server = tls.client_session(API), server_tls.server_session()
    pump(live, live_server)
    source.update(replace(web, bundle_pem=other_pki.bundle.pem()))  # our anchor is gone
    with pytest.raises(TLSError, match="verify failed: unable to get local issuer certificate"):
        pump(tls.client_session(API), server_tls.server_session())
    assert live_server.feed(live.encrypt(b"still up"))[0] == b"still up"
    assert live.feed(live_server.encrypt(b"and back"))[0] == b"and back"


@pytest.mark.parametrize(
    "first",
    [
        f"{WEB}\r\nl5d-client-id: admin.{DOMAIN}",  # would add a header line at the app
        f"{WEB}\r\n\r\nGET /admin HTTP/1.1",  # or end the head early: request smuggling
        f"web {DOMAIN}",
        f"{WEB}\x00.evil.example",
        "spiffe://cluster.local/ns/default/sa/web\n",
    ],
    ids=["crlf-header", "crlf-smuggle", "space", "nul", "uri-newline"],
)
def test_server_refuses_a_client_identity_that_is_not_a_name(pki, first) -> None:
    """The client identity becomes the ``l5d-client-id`` header line, a metrics label and a
    policy subject, so a first SAN with whitespace or control characters (only a misbehaving
    CA could sign one: identity names are DNS labels) is refused, not passed on."""
    client = forged(pki, WEB, Spec(sans=(first, WEB)))
    with pytest.raises(TLSError, match="not a valid identity name"):
        handshake(client, pki.credentials("api"))


async def test_a_forged_identity_never_reaches_the_application(pki) -> None:
    """Through two real proxies: the client proxy presents a certificate whose first SAN would
    add an ``l5d-client-id`` line of its choosing. The server proxy refuses the handshake, so
    the application sees nothing (before, it got the injected header line)."""
    heads: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    injected = f"{WEB}\r\nl5d-client-id: admin.{DOMAIN}"
    web = forged(pki, WEB, Spec(sans=(injected, WEB)))
    server = await asyncio.start_server(app, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        async with run_mesh(web, pki.credentials("api"), app_port=port) as mesh:
            reply = await raw_exchange(
                mesh.outbound, b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
            )
            assert reply.startswith(b"HTTP/1.1 502"), heads
            assert heads == []
            assert (
                'tls_handshakes_total{direction="inbound",group="X25519MLKEM768",result="error"} 1'
                in mesh.server.metrics.render()
            )
    finally:
        server.close()


@pytest.mark.parametrize("promised", ["api.défault.cluster.local", f"api {DOMAIN}", "", API + "\n"])
def test_a_promised_identity_that_is_not_a_name_is_a_tls_error(pki, promised) -> None:
    """Discovery's identity for an endpoint becomes the SNI; a non-ASCII or blank one raised
    UnicodeEncodeError (or went out as is) instead of a TLSError the proxy answers 502."""
    with pytest.raises(TLSError, match="not a valid identity name"):
        MeshTls(StaticCredentials(pki.credentials("web"))).client_session(promised)


async def test_a_bad_promised_identity_gets_a_502_not_a_hung_request(pki) -> None:
    web, api = pki.credentials("web"), pki.credentials("api")
    async with run_mesh(web, api, app_port=9, expected_identity="api.défault") as mesh:
        reply = await raw_exchange(
            mesh.outbound, b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 502")
        assert b"not a valid identity name" in reply
