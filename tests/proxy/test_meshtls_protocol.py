"""Mesh TLS against clients that are not our own: what a hostile or merely different TLS stack
can negotiate with the server side (key-exchange groups, protocol versions, session tickets,
early data, post-handshake authentication), with real handshakes over memory BIOs."""

from __future__ import annotations

import pytest
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi, lib
from test_meshtls import pump

from proxy.errors import KexRefused, TLSError
from proxy.meshtls import (
    HYBRID_GROUP,
    MeshCredentials,
    MeshTls,
    StaticCredentials,
    TlsSession,
    split_pem_certificates,
)
from proxy.settings import KexPolicy
from proxy.transport_header import ALPN

pytestmark = pytest.mark.timeout(30)


class RawClient:
    """A plain pyOpenSSL client: its own group list, versions and (optional) certificate.

    One context for all its connections, so a session from one can be offered on the next.
    """

    def __init__(
        self,
        bundle_pem: bytes,
        *,
        groups: bytes = b"X25519MLKEM768:X25519",
        creds: MeshCredentials | None = None,
        min_version: int = SSL.TLS1_3_VERSION,
        max_version: int = SSL.TLS1_3_VERSION,
    ) -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(min_version)
        ctx.set_max_proto_version(max_version)
        assert lib.SSL_CTX_set1_curves_list(ctx._context, groups) == 1
        ctx.get_cert_store().add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, bundle_pem))
        ctx.set_verify(SSL.VERIFY_PEER)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)  # keep tickets, as many stacks do
        if creds is not None:
            chain = split_pem_certificates(creds.chain_pem)
            ctx.use_certificate(chain[0])
            for extra in chain[1:]:
                ctx.add_extra_chain_cert(extra)
            ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, creds.key_pem))
        self.ctx = ctx

    def connect(
        self, server: TlsSession, sni: str | None = None, session: SSL.Session | None = None
    ) -> SSL.Connection:
        """Handshake with ``server`` (bounded), then take any post-handshake messages."""
        conn = SSL.Connection(self.ctx, None)
        if sni is not None:
            conn.set_tlsext_host_name(sni.encode())
        if session is not None:
            conn.set_session(session)
        conn.set_connect_state()
        for _ in range(10):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
            out = _pending(conn)
            _, back = server.feed(out)
            if back:
                conn.bio_write(back)
            if server.info is not None and not out and not back:
                break
        try:
            conn.recv(1)  # reads NewSessionTicket messages, if the server sent any
        except SSL.WantReadError:
            pass
        return conn


def _pending(conn: SSL.Connection) -> bytes:
    try:
        return conn.bio_read(65536)
    except SSL.WantReadError:
        return b""


def _reused(conn: SSL.Connection | TlsSession) -> bool:
    return bool(lib.SSL_session_reused(conn._ssl))


# --- key exchange ----------------------------------------------------------------------------


@pytest.mark.parametrize("kex", list(KexPolicy))
@pytest.mark.parametrize(
    "groups", [b"X25519:X25519MLKEM768", b"P-256:X25519:X25519MLKEM768", b"X25519MLKEM768"]
)
def test_server_picks_hybrid_whenever_the_client_supports_it(pki, kex, groups) -> None:
    """A client that lists X25519MLKEM768 but sends its first key share for a classical group
    (Go, BoringSSL and OpenSSL configurations do) must still get the hybrid group: the server
    asks for a hybrid key share (HelloRetryRequest) rather than settle for X25519. Before, the
    server took X25519, so hybrid-preferred was silently classical and hybrid-required refused
    a client that could have done hybrid."""
    api = pki.credentials("api")
    server = MeshTls(StaticCredentials(api), kex).server_session()
    RawClient(pki.bundle.pem(), groups=groups).connect(server, api.identity)
    assert server.info is not None and server.info.group == HYBRID_GROUP


def test_classical_only_client_under_each_policy(pki) -> None:
    """Only X25519 on offer: refused under hybrid-required (the group is known for the count),
    accepted and reported as x25519 under hybrid-preferred."""
    api = pki.credentials("api")
    required = MeshTls(StaticCredentials(api), KexPolicy.HYBRID_REQUIRED).server_session()
    with pytest.raises(KexRefused, match="negotiated x25519"):
        RawClient(pki.bundle.pem(), groups=b"X25519").connect(required, api.identity)
    assert required.group == "x25519" and required.info is None
    preferred = MeshTls(StaticCredentials(api), KexPolicy.HYBRID_PREFERRED).server_session()
    RawClient(pki.bundle.pem(), groups=b"X25519:P-256").connect(preferred, api.identity)
    assert preferred.info is not None and preferred.info.group == "x25519"


def _classical_server(creds: MeshCredentials) -> SSL.Connection:
    ctx = SSL.Context(SSL.TLS_METHOD)
    assert lib.SSL_CTX_set1_curves_list(ctx._context, b"X25519") == 1
    chain = split_pem_certificates(creds.chain_pem)
    ctx.use_certificate(chain[0])
    ctx.add_extra_chain_cert(chain[1])
    ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, creds.key_pem))
    ctx.set_alpn_select_callback(lambda _conn, _offered: ALPN)  # a (classical) mesh inbound
    conn = SSL.Connection(ctx, None)
    conn.set_accept_state()
    return conn


def _exchange(client: TlsSession, server: SSL.Connection, out: bytes) -> None:
    for _ in range(5):  # ClientHello, HelloRetryRequest, ClientHello, ServerHello...
        server.bio_write(out)
        try:
            server.do_handshake()
        except SSL.WantReadError:
            pass
        _, out = client.feed(_pending(server))
        if client.info is not None:
            return
    raise AssertionError("handshake did not finish in 5 flights")


@pytest.mark.parametrize("kex", list(KexPolicy))
def test_our_client_against_a_classical_only_server(pki, kex) -> None:
    """Under hybrid-required our client refuses a server that can only do X25519; under
    hybrid-preferred it accepts it. Its ClientHello carries a single (hybrid) key share."""
    web, api = pki.credentials("web"), pki.credentials("api")
    client = MeshTls(StaticCredentials(web), kex).client_session(api.identity)
    hello = client.start()
    assert 1200 < len(hello) < 1600  # one ML-KEM-768 + X25519 share (1216 bytes), not two
    server = _classical_server(api)
    if kex is KexPolicy.HYBRID_REQUIRED:
        with pytest.raises(KexRefused, match="x25519"):
            _exchange(client, server, hello)
    else:
        _exchange(client, server, hello)
        assert client.info is not None and client.info.group == "x25519"


# --- protocol versions and handshake features ------------------------------------------------


def test_tls_1_2_is_refused(pki) -> None:
    api = pki.credentials("api")
    server = MeshTls(StaticCredentials(api)).server_session()
    client = RawClient(
        pki.bundle.pem(), min_version=SSL.TLS1_2_VERSION, max_version=SSL.TLS1_2_VERSION
    )
    with pytest.raises(TLSError, match="unsupported protocol"):
        client.connect(server, api.identity)
    assert server.info is None


def test_a_session_ticket_is_never_resumed_and_never_fails_the_handshake(pki) -> None:
    """Resumption is off (Linkerd disables it): every connection verifies the client's
    certificate again, so an identity cannot outlive its certificate or trust bundle through a
    ticket, and there is no 0-RTT. A client that offers a ticket (rustls, Go and OpenSSL cache
    them by default) gets a full handshake. Before, the server issued encrypted tickets and
    then failed the handshake of any client that offered one ("session id context
    uninitialized")."""
    web, api = pki.credentials("web"), pki.credentials("api")
    tls = MeshTls(StaticCredentials(api))
    client = RawClient(pki.bundle.pem(), creds=web)
    first = client.connect(server := tls.server_session(), api.identity)
    assert server.info is not None and server.info.peer_identity == web.identity
    session = first.get_session()
    assert session is not None
    # Whatever the server left the client with allows no early data.
    assert lib.SSL_SESSION_get_max_early_data(session._session) == 0
    again = client.connect(second := tls.server_session(), api.identity, session=session)
    assert second.info is not None and second.info.peer_identity == web.identity
    assert not _reused(second) and not _reused(again)


def test_early_data_is_not_accepted(pki) -> None:
    """A client cannot send 0-RTT data: there is no resumable session that permits it, and the
    server reads nothing before the handshake is complete."""
    web, api = pki.credentials("web"), pki.credentials("api")
    tls = MeshTls(StaticCredentials(api))
    client = RawClient(pki.bundle.pem(), creds=web)
    session = client.connect(tls.server_session(), api.identity).get_session()
    conn = SSL.Connection(client.ctx, None)
    conn.set_session(session)
    conn.set_connect_state()
    written = lib.SSL_write_early_data(
        conn._ssl, b"GET / HTTP/1.1\r\n\r\n", 18, ffi.new("size_t *")
    )
    assert written == 0  # OpenSSL refuses: the session allows no early data
    lib.ERR_clear_error()


def test_post_handshake_authentication_is_never_offered(pki) -> None:
    """Our client does not offer post-handshake authentication, so a server cannot ask it to
    authenticate again later; our server never asks."""
    web, api = pki.credentials("web"), pki.credentials("api")
    client = MeshTls(StaticCredentials(web)).client_session(api.identity)
    server = MeshTls(StaticCredentials(api)).server_session()
    pump(client, server)
    # SSL_verify_client_post_handshake fails when the client did not send the extension.
    assert lib.SSL_verify_client_post_handshake(server._ssl) == 0
    lib.ERR_clear_error()
