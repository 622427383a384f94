"""Mesh TLS hardening, with real TLS 1.3 handshakes: the security level (RSA-1024 and SHA-1
refused from peers and in our own credentials, every pki key algorithm still accepted, whatever
the OpenSSL configuration says), the transport header written only after ALPN
``transport.l5d.io/v1`` was selected, and DNS identities compared without regard to case.

Peers that present what our proxies never would are plain pyOpenSSL contexts at OpenSSL
security level 0 (OpenSSL would refuse to load their certificates otherwise)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from OpenSSL import SSL, crypto
from OpenSSL._util import lib
from proxy_mesh import raw_exchange, run_app, run_mesh
from test_meshtls import pump
from test_meshtls_certs import API, DOMAIN, WEB, Spec, build, forged, pem

import proxy
from pki.bundle import TrustBundle
from pki.certs import Credential, create_anchor, create_issuer, issue_identity
from pki.keys import KeyAlgorithm, PrivateKey
from pki.names import Identity
from proxy.errors import AlpnRefused, PeerIdentityMismatch, TLSError
from proxy.meshtls import (
    HYBRID_GROUP,
    MeshCredentials,
    MeshTls,
    StaticCredentials,
    TlsSession,
    split_pem_certificates,
)
from proxy.routes import Endpoint, Service
from proxy.transport_header import ALPN

pytestmark = pytest.mark.timeout(30)

KEY_TOO_WEAK = "certificate verify failed: EE certificate key too weak"
SHA1_TOO_WEAK = "certificate verify failed: CA signature digest algorithm too weak"


# --- peers our proxies would never be -------------------------------------------------------


def rsa_peer(pki: Any, identity: str, bits: int) -> MeshCredentials:
    """Credentials whose leaf has an RSA key of ``bits``, signed by the PKI's issuer."""
    key = rsa.generate_private_key(65537, bits)
    issuer = pki.issuer.certificate.x509
    leaf = build(Spec(), identity, key, pki.issuer.key, issuer.subject)  # type: ignore[arg-type]
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return MeshCredentials(identity, pem(leaf, issuer), key_pem, pki.bundle.pem())


def sha1_peer(pki: Any, identity: str, workdir: Path) -> MeshCredentials:
    """Credentials whose P-256 leaf the PKI's issuer signed with ECDSA-SHA1. cryptography no
    longer signs with SHA-1, so the system's openssl command does it (as a misbehaving CA)."""
    workdir.mkdir(parents=True, exist_ok=True)
    key = PrivateKey.generate()
    (workdir / "ca.pem").write_bytes(pki.issuer.certificate.pem)
    (workdir / "ca.key").write_bytes(pki.issuer.key.to_pem())
    (workdir / "leaf.key").write_bytes(key.to_pem())
    os.chmod(workdir / "ca.key", 0o600)
    os.chmod(workdir / "leaf.key", 0o600)
    (workdir / "ext").write_text(
        f"subjectAltName=DNS:{identity}\nextendedKeyUsage=serverAuth,clientAuth\n"
        "basicConstraints=critical,CA:false\nkeyUsage=critical,digitalSignature\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    sign = "x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -sha1 -set_serial 7 -days 1"
    for argv in (
        ["req", "-new", "-key", "leaf.key", "-subj", f"/CN={identity}", "-out", "leaf.csr"],
        [*sign.split(), "-extfile", "ext", "-out", "leaf.pem"],
    ):
        subprocess.run(["openssl", *argv], cwd=workdir, check=True, capture_output=True, timeout=20)
    leaf = (workdir / "leaf.pem").read_bytes()
    assert b"sha1" in subprocess.run(
        ["openssl", "x509", "-in", "leaf.pem", "-noout", "-text"],
        cwd=workdir,
        check=True,
        capture_output=True,
        timeout=20,
    ).stdout.replace(b"SHA1", b"sha1")
    return MeshCredentials(
        identity, leaf + pki.issuer.certificate.pem, key.to_pem(), pki.bundle.pem()
    )


def raw_context(creds: MeshCredentials, *, alpn: bool = True) -> SSL.Context:
    """A plain pyOpenSSL TLS 1.3 context presenting ``creds`` at security level 0, verifying
    its peer against ``creds``' bundle; as a server it selects ALPN only with ``alpn``."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    assert lib.SSL_CTX_set1_curves_list(ctx._context, b"X25519MLKEM768:X25519") == 1
    chain = split_pem_certificates(creds.chain_pem)
    ctx.use_certificate(chain[0])
    for extra in chain[1:]:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, creds.key_pem))
    for anchor in split_pem_certificates(creds.bundle_pem):
        ctx.get_cert_store().add_cert(anchor)
    ctx.set_verify(SSL.VERIFY_PEER)
    if alpn:
        ctx.set_alpn_select_callback(lambda _conn, offered: ALPN if ALPN in offered else b"")
    return ctx


def _pending(conn: SSL.Connection) -> bytes:
    try:
        return conn.bio_read(65536)
    except SSL.WantReadError:
        return b""


def drive(ours: TlsSession, theirs: SSL.Connection) -> None:
    """Handshake one of our sessions with a raw connection (either side first), bounded."""
    out = ours.start()
    for _ in range(10):
        if out:
            theirs.bio_write(out)
        with contextlib.suppress(SSL.WantReadError):
            theirs.do_handshake()
        back = _pending(theirs)
        _, out = ours.feed(back) if back else (b"", b"")
        if ours.info is not None and not out and not back:
            return
    raise AssertionError("handshake did not finish in 10 flights")


def our_client_to(peer: MeshCredentials, ours: MeshCredentials, expect: str = API) -> TlsSession:
    client = MeshTls(StaticCredentials(ours)).client_session(expect)
    server = SSL.Connection(raw_context(peer), None)
    server.set_accept_state()
    drive(client, server)
    return client


def our_server_from(peer: MeshCredentials, ours: MeshCredentials) -> TlsSession:
    server = MeshTls(StaticCredentials(ours)).server_session()
    client = SSL.Connection(raw_context(peer), None)
    client.set_alpn_protos([ALPN])
    client.set_connect_state()
    drive(server, client)
    return server


# --- security level 2 -----------------------------------------------------------------------

WEAK: dict[str, tuple[Callable[[Any, str, Path], MeshCredentials], str]] = {
    "rsa-1024": (lambda pki, ident, _tmp: rsa_peer(pki, ident, 1024), KEY_TOO_WEAK),
    "sha1-signed": (lambda pki, ident, tmp: sha1_peer(pki, ident, tmp / ident), SHA1_TOO_WEAK),
}


@pytest.mark.parametrize("case", list(WEAK))
def test_a_peer_below_security_level_2_is_refused_by_either_side(pki, case, tmp_path) -> None:
    make, reason = WEAK[case]
    with pytest.raises(TLSError, match=reason):
        our_client_to(make(pki, API, tmp_path), pki.credentials("web"))
    with pytest.raises(TLSError, match=reason):
        our_server_from(make(pki, WEB, tmp_path), pki.credentials("api"))


def test_an_rsa_2048_peer_is_still_accepted(pki) -> None:
    """Level 2's boundary: 112 bits of security. pki never issues RSA, but a peer's RSA-2048
    leaf from the mesh's CA is not refused for its key."""
    client = our_client_to(rsa_peer(pki, API, 2048), pki.credentials("web"))
    assert client.info is not None and client.info.peer_identity == API
    server = our_server_from(rsa_peer(pki, WEB, 2048), pki.credentials("api"))
    assert server.info is not None and server.info.peer_identity == WEB


@dataclass
class AlgorithmPKI:
    issuer: Credential
    bundle: TrustBundle
    keys: dict[str, PrivateKey] = field(default_factory=dict)

    def credentials(self, sa: str, algorithm: KeyAlgorithm) -> MeshCredentials:
        ident = Identity(sa, "default")
        key = PrivateKey.generate(algorithm)
        cred = issue_identity(ident, key, self.issuer, now=datetime.now(UTC))
        return MeshCredentials(ident.dns_name, cred.chain_pem(), key.to_pem(), self.bundle.pem())


@pytest.mark.parametrize("leaf", list(KeyAlgorithm), ids=lambda a: f"leaf-{a.value}")
@pytest.mark.parametrize("ca", list(KeyAlgorithm), ids=lambda a: f"ca-{a.value}")
def test_every_pki_key_algorithm_handshakes_at_level_2(ca, leaf) -> None:
    """Anchor and issuer of one algorithm, both leaves of another: P-256 and ML-DSA-65 in
    every combination pki issues pass the security level on both sides (our own credentials
    load, the peer's verify)."""
    now = datetime.now(UTC)
    akey = PrivateKey.generate(ca)
    anchor = Credential(create_anchor(akey, now=now, lifetime=timedelta(days=30)), akey)
    issuer = create_issuer(PrivateKey.generate(ca), anchor, now=now, lifetime=timedelta(days=7))
    mesh = AlgorithmPKI(issuer, TrustBundle.of([anchor.certificate]))
    web, api = mesh.credentials("web", leaf), mesh.credentials("api", leaf)
    client = MeshTls(StaticCredentials(web)).client_session(api.identity)
    server = MeshTls(StaticCredentials(api)).server_session()
    pump(client, server)
    assert client.info is not None and server.info is not None
    assert client.info.group == HYBRID_GROUP
    assert (client.info.peer_identity, server.info.peer_identity) == (api.identity, web.identity)


def test_our_own_weak_certificate_is_a_credentials_error_and_the_last_good_stays(pki) -> None:
    """An RSA-1024 certificate handed to the proxy is refused as unusable credentials (before,
    OpenSSL's "ee key too small" escaped as a raw SSL.Error, past the keep-the-last-good rule)."""
    weak = rsa_peer(pki, API, 1024)
    with pytest.raises(TLSError, match="certificate chain cannot be used: ee key too small"):
        MeshTls(StaticCredentials(weak)).server_session()
    good = pki.credentials("api")
    source = StaticCredentials(good)
    tls = MeshTls(source)
    tls.server_session()  # contexts built from the good credentials
    source.update(weak)
    server = tls.server_session()  # still built from the last good credentials
    client = MeshTls(StaticCredentials(pki.credentials("web"))).client_session(API)
    pump(client, server)
    assert tls.credentials is good


def test_our_own_sha1_signed_certificate_is_a_credentials_error(pki, tmp_path) -> None:
    """A leaf its CA signed with SHA-1 would load into OpenSSL (it checks only the chains it
    verifies) and then fail every handshake at the peer; it is refused when the credentials
    load instead, and the last good ones stay in use."""
    weak = sha1_peer(pki, API, tmp_path / "sha1")
    with pytest.raises(TLSError, match="cannot be used: the leaf is signed with SHA1"):
        MeshTls(StaticCredentials(weak)).server_session()
    good = pki.credentials("api")
    source = StaticCredentials(good)
    tls = MeshTls(source)
    tls.server_session()
    source.update(weak)
    server = tls.server_session()
    client = MeshTls(StaticCredentials(pki.credentials("web"))).client_session(API)
    pump(client, server)
    assert tls.credentials is good


LOWERING_CONFIG = """openssl_conf = default_conf
[default_conf]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
CipherString = DEFAULT:@SECLEVEL={level}
"""


@pytest.mark.parametrize("level", [0, 1])
def test_the_level_holds_when_the_openssl_configuration_lowers_it(pki, tmp_path, level) -> None:
    """OPENSSL_CONF (or a distribution's legacy crypto policy) can lower OpenSSL's default
    security level for every context. The proxy pins level 2, so a fresh process under such a
    configuration still refuses an RSA-1024 or SHA-1-signed peer on both sides. Before, at
    level 1 an RSA-1024 peer was accepted, and at level 0 both were."""
    files = {
        "web": pki.credentials("web"),
        "api": pki.credentials("api"),
        "rsa-1024-api": rsa_peer(pki, API, 1024),
        "rsa-1024-web": rsa_peer(pki, WEB, 1024),
        "sha1-api": sha1_peer(pki, API, tmp_path / "sha1-api"),
        "sha1-web": sha1_peer(pki, WEB, tmp_path / "sha1-web"),
    }
    for name, creds in files.items():
        fields = {k: getattr(creds, k).decode() for k in ("chain_pem", "key_pem", "bundle_pem")}
        (tmp_path / f"{name}.json").write_text(json.dumps(fields | {"identity": creds.identity}))
    (tmp_path / "openssl.cnf").write_text(LOWERING_CONFIG.format(level=level))
    # The child imports the proxy package this process tests, and the config before OpenSSL
    # initialises (that is when OpenSSL reads it).
    root = str(Path(proxy.__file__).parents[1])
    env = dict(os.environ, OPENSSL_CONF=str(tmp_path / "openssl.cnf"), PYTHONPATH=root)
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    results = json.loads(done.stdout)
    assert results["control"] == "ok"  # a good raw peer handshakes in that process
    for case in ("rsa-1024", "sha1"):
        reason = KEY_TOO_WEAK if case == "rsa-1024" else SHA1_TOO_WEAK
        assert reason in results[f"{case}: our client"], results
        assert reason in results[f"{case}: our server"], results


def _under_a_lowered_level(workdir: Path) -> dict[str, str]:
    """The subprocess side of the test above: each scenario's outcome, "ok" or the error."""

    def load(name: str) -> MeshCredentials:
        raw = json.loads((workdir / f"{name}.json").read_text())
        return MeshCredentials(**{k: v if k == "identity" else v.encode() for k, v in raw.items()})

    web, api = load("web"), load("api")
    scenarios: dict[str, Callable[[], object]] = {
        "control": lambda: our_client_to(api, web),
    }
    for case in ("rsa-1024", "sha1"):
        scenarios[f"{case}: our client"] = lambda c=case: our_client_to(load(f"{c}-api"), web)
        scenarios[f"{case}: our server"] = lambda c=case: our_server_from(load(f"{c}-web"), api)
    results = {}
    for name, run in scenarios.items():
        try:
            run()
            results[name] = "ok"
        except TLSError as e:
            results[name] = str(e)
    return results


# --- the transport header only after ALPN transport.l5d.io/v1 --------------------------------


def test_our_client_refuses_a_server_that_does_not_select_the_transport_alpn(pki) -> None:
    """A TLS server with the right identity that is not a mesh inbound (it ignores ALPN)."""
    client = MeshTls(StaticCredentials(pki.credentials("web"))).client_session(API)
    server = SSL.Connection(raw_context(pki.credentials("api"), alpn=False), None)
    server.set_accept_state()
    message = f"peer {API} did not negotiate ALPN transport.l5d.io/v1"
    with pytest.raises(AlpnRefused, match=message):
        drive(client, server)
    assert client.info is None


@dataclass
class PlainTlsServer:
    port: int
    received: bytearray = field(default_factory=bytearray)


@contextlib.asynccontextmanager
async def plain_tls_server(ctx: SSL.Context) -> AsyncIterator[PlainTlsServer]:
    """A TLS server on 127.0.0.1 (not a proxy) that keeps every plaintext byte it receives."""
    state = PlainTlsServer(0)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = SSL.Connection(ctx, None)
        conn.set_accept_state()
        done = False
        try:
            async with asyncio.timeout(10):
                while data := await reader.read(65536):
                    conn.bio_write(data)
                    if not done:
                        with contextlib.suppress(SSL.WantReadError):
                            conn.do_handshake()
                            done = True
                    if done:
                        with contextlib.suppress(SSL.WantReadError, SSL.ZeroReturnError):
                            while chunk := conn.recv(65536):
                                state.received += chunk
                    if out := _pending(conn):
                        writer.write(out)
        except (SSL.Error, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


async def test_a_non_mesh_tls_server_gets_no_transport_header_and_the_request_a_502(pki) -> None:
    """Through a real client proxy: discovery points the api service at a TLS server that
    presents api's valid certificate but selects no ALPN. The handshake completes, the client
    proxy refuses the connection before writing anything (before, the transport header and
    the request went to that server as data), counts it and answers 502 naming the problem."""
    web, api = pki.credentials("web"), pki.credentials("api")
    async with (
        plain_tls_server(raw_context(api, alpn=False)) as impostor,
        run_mesh(web, api, app_port=9) as mesh,
    ):
        mesh.routes.replace((Service("api", (Endpoint("127.0.0.1", 8080, API, impostor.port),)),))
        reply = await raw_exchange(
            mesh.outbound, b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 502"), reply
        assert f"peer {API} did not negotiate ALPN transport.l5d.io/v1".encode() in reply
        assert bytes(impostor.received) == b""
        # Refused once the server's flight was verified: the group is known.
        rendered = mesh.client.metrics.render()
        counted = (
            'tls_handshakes_total{direction="outbound",group="X25519MLKEM768",'
            'result="alpn_refused"} 1'
        )
        assert counted in rendered, rendered


# --- DNS identities compare without regard to case -------------------------------------------

MIXED_API = "Api.Default.ServiceAccount.identity.TrustMesh.cluster.LOCAL"
MIXED_WEB = f"Web.{DOMAIN.upper()}"


def test_a_mixed_case_promised_identity_matches_the_lower_case_san(pki) -> None:
    """Discovery's answer in another case: the lower-case SAN matches (RFC 6125 6.4.1); the
    SNI and the peer identity the client reports are the lower-case form."""
    client = MeshTls(StaticCredentials(pki.credentials("web"))).client_session(MIXED_API)
    server = MeshTls(StaticCredentials(pki.credentials("api"))).server_session()
    pump(client, server)
    assert client.info is not None and client.info.peer_identity == API
    assert server._conn.get_servername() == API.encode()


def test_a_mixed_case_san_matches_the_lower_case_promised_identity(pki) -> None:
    client = MeshTls(StaticCredentials(pki.credentials("web"))).client_session(API)
    server = MeshTls(StaticCredentials(forged(pki, API, Spec(sans=(MIXED_API,))))).server_session()
    pump(client, server)
    assert client.info is not None and client.info.peer_identity == API


def test_the_server_learns_a_mixed_case_client_san_in_lower_case(pki) -> None:
    """The client id (l5d-client-id, policy subject, metrics label) is the lower-case form, as
    the identity service issues names and policies list them: one identity, one spelling."""
    client = MeshTls(StaticCredentials(forged(pki, WEB, Spec(sans=(MIXED_WEB,))))).client_session(
        API
    )
    server = MeshTls(StaticCredentials(pki.credentials("api"))).server_session()
    pump(client, server)
    assert server.info is not None and server.info.peer_identity == WEB


@pytest.mark.parametrize(
    ("promised", "sans"),
    [
        (MIXED_API, (f"db.{DOMAIN}",)),  # another name, whatever the case
        (MIXED_API.replace("Api", "Apx"), (API,)),
        (API, ("spiffe://cluster.local/ns/default/sa/api",)),
        # URI SANs keep exact comparison (their paths are case-sensitive)...
        ("spiffe://cluster.local/ns/default/sa/api", ("spiffe://cluster.local/ns/Default/sa/api",)),
        # ...and a DNS SAN never matches a URI identity by case folding.
        ("spiffe://cluster.local/ns/default/sa/api", ("SPIFFE://cluster.local/ns/default/sa/api",)),
    ],
    ids=["other-name", "one-letter", "dns-vs-uri", "uri-case", "dns-san-uri-form"],
)
def test_any_other_identity_is_still_refused(pki, promised, sans) -> None:
    client = MeshTls(StaticCredentials(pki.credentials("web"))).client_session(promised)
    server = MeshTls(StaticCredentials(forged(pki, API, Spec(sans=sans)))).server_session()
    with pytest.raises(PeerIdentityMismatch, match="not the expected"):
        pump(client, server)


async def test_a_mixed_case_identity_from_discovery_works_through_two_proxies(pki) -> None:
    """End to end: discovery names the endpoint's identity in another case. The client proxy
    sends the lower-case SNI the server proxy expects, and the request gets through (before,
    the client refused the server's certificate: 502)."""
    async with (
        run_app() as app_port,
        run_mesh(
            pki.credentials("web"), pki.credentials("api"), app_port=app_port,
            expected_identity=MIXED_API,
        ) as mesh,
    ):  # fmt: skip
        reply = await raw_exchange(
            mesh.outbound, b"GET /echo HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
        )
        assert reply.startswith(b"HTTP/1.1 200"), reply
        assert f"x-client-id: {WEB}".lower().encode() in reply.lower()


if __name__ == "__main__":  # the subprocess of test_the_level_holds_when_the_openssl_...
    print(json.dumps(_under_a_lowered_level(Path(sys.argv[1]))))
