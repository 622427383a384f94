"""Mesh TLS sessions: real TLS 1.3 handshakes between memory-BIO sessions and against
classical-only and foreign clients."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from OpenSSL import SSL, crypto
from OpenSSL._util import lib

from proxy.errors import ConfigError, KexRefused, PeerIdentityMismatch, TLSError
from proxy.meshtls import HYBRID_GROUP, MeshCredentials, MeshTls, StaticCredentials, TlsSession
from proxy.settings import KexPolicy
from proxy.transport_header import ALPN


def pump(client: TlsSession, server: TlsSession) -> None:
    """Exchange handshake flights until both sides are done (bounded)."""
    out = client.start()
    for _ in range(10):
        _, back = server.feed(out) if out else (b"", b"")
        _, out = client.feed(back) if back else (b"", b"")
        if client.info is not None and server.info is not None:
            return
    raise AssertionError("handshake did not finish in 10 flights")


def test_mutual_hybrid_handshake_and_data(pki) -> None:
    web, api = pki.credentials("web"), pki.credentials("api", spiffe=True)
    client = MeshTls(StaticCredentials(web)).client_session(api.identity)
    server = MeshTls(StaticCredentials(api)).server_session()
    pump(client, server)
    assert client.info.group == server.info.group == HYBRID_GROUP
    assert client.info.peer_identity == api.identity
    assert server.info.peer_identity == web.identity  # learned from the client certificate
    assert client.info.alpn == server.info.alpn == ALPN
    plain, _ = server.feed(client.encrypt(b"hello"))
    assert plain == b"hello"
    reply, _ = client.feed(server.encrypt(b"world"))
    assert reply == b"world"
    plain, _ = server.feed(client.close_notify())
    assert plain == b"" and server.closed


def test_records_split_joined_and_followed_by_close_notify(pki) -> None:
    """feed() skips its second read only when no input is left: records that arrive together,
    a record split across feeds, and a close_notify behind data must all come through."""
    web, api = pki.credentials("web"), pki.credentials("api")
    client = MeshTls(StaticCredentials(web)).client_session(api.identity)
    server = MeshTls(StaticCredentials(api)).server_session()
    pump(client, server)
    two = client.encrypt(b"one") + client.encrypt(b"two")
    assert server.feed(two)[0] == b"onetwo"
    record = client.encrypt(b"split")
    assert server.feed(record[:7]) == (b"", b"")
    assert server.feed(record[7:])[0] == b"split"
    big = bytes(range(256)) * 300  # several records
    assert server.feed(client.encrypt(big))[0] == big
    # A whole record and the start of the next, then the rest, then single records again.
    first, second = client.encrypt(b"first"), client.encrypt(b"second")
    assert server.feed(first + second[:6])[0] == b"first"
    assert server.feed(second[6:])[0] == b"second"
    for i in range(3):
        assert server.feed(client.encrypt(b"n%d" % i)) == (b"n%d" % i, b"")
    last = client.encrypt(b"last") + client.close_notify()
    plain, _ = server.feed(last)
    assert plain == b"last" and server.closed


def test_wrong_identity_is_refused(pki) -> None:
    web, api = pki.credentials("web"), pki.credentials("api")
    client = MeshTls(StaticCredentials(web)).client_session(
        "db.default.serviceaccount.identity.trustmesh.cluster.local"
    )
    server = MeshTls(StaticCredentials(api)).server_session()
    with pytest.raises(PeerIdentityMismatch, match=api.identity):
        pump(client, server)


def test_foreign_trust_anchor_is_refused(pki, other_pki) -> None:
    web, api = pki.credentials("web"), other_pki.credentials("api")
    client = MeshTls(StaticCredentials(web)).client_session(api.identity)
    server = MeshTls(StaticCredentials(api)).server_session()
    with pytest.raises(TLSError, match="certificate verify failed"):
        pump(client, server)


def classical_client(bundle_pem: bytes, groups: bytes) -> SSL.Connection:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    assert lib.SSL_CTX_set1_curves_list(ctx._context, groups) == 1
    ctx.get_cert_store().add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, bundle_pem))
    ctx.set_verify(SSL.VERIFY_PEER)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    return conn


def run_raw_client(conn: SSL.Connection, server: TlsSession) -> None:
    out = b""
    for _ in range(10):
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            out = conn.bio_read(65536)
        except SSL.WantReadError:
            out = b""
        _, back = server.feed(out)
        if back:
            conn.bio_write(back)
        if server.info is not None:
            return


def test_classical_client_refused_under_hybrid_required(pki) -> None:
    api = pki.credentials("api")
    server = MeshTls(StaticCredentials(api), KexPolicy.HYBRID_REQUIRED).server_session()
    with pytest.raises(KexRefused, match="x25519"):
        run_raw_client(classical_client(pki.bundle.pem(), b"X25519"), server)
    assert server.group == "x25519"


def test_classical_client_accepted_under_hybrid_preferred(pki) -> None:
    api = pki.credentials("api")
    server = MeshTls(StaticCredentials(api), KexPolicy.HYBRID_PREFERRED).server_session()
    run_raw_client(classical_client(pki.bundle.pem(), b"X25519"), server)
    assert server.info is not None and server.info.group == "x25519"
    assert server.info.peer_identity is None  # no client certificate: unauthenticated


def test_new_credentials_apply_to_new_sessions_only(pki, other_pki) -> None:
    source = StaticCredentials(pki.credentials("web"))
    tls = MeshTls(source)
    server = MeshTls(StaticCredentials(pki.credentials("api"))).server_session()
    old = tls.client_session(
        server_identity := "api.default.serviceaccount.identity.trustmesh.cluster.local"
    )
    pump(old, server)
    renewed = pki.credentials("web")
    source.update(renewed)
    fresh_server = MeshTls(StaticCredentials(pki.credentials("api"))).server_session()
    fresh = tls.client_session(server_identity)
    pump(fresh, fresh_server)
    # The live session still works after the swap.
    plain, _ = server.feed(old.encrypt(b"still here"))
    assert plain == b"still here"
    # The new client presented the renewed certificate.
    peer = fresh_server._conn.get_peer_certificate()
    assert peer.get_serial_number() != server._conn.get_peer_certificate().get_serial_number()
    assert renewed.chain_pem.startswith(crypto.dump_certificate(crypto.FILETYPE_PEM, peer))


def test_no_credentials_yet() -> None:
    with pytest.raises(TLSError, match="not ready"):
        MeshTls(StaticCredentials()).server_session()


def test_bad_credentials(pki) -> None:
    web, api = pki.credentials("web"), pki.credentials("api")
    with pytest.raises(TLSError, match="cannot be used: the private key does not match"):
        MeshTls(
            StaticCredentials(
                MeshCredentials(web.identity, web.chain_pem, api.key_pem, web.bundle_pem)
            )
        ).server_session()
    with pytest.raises(ConfigError, match="PEM"):
        MeshCredentials(web.identity, b"junk", web.key_pem, web.bundle_pem)
    assert "PRIVATE" not in repr(web)


def test_unusable_new_credentials_keep_the_last_good_ones(pki, caplog) -> None:
    """Credentials that cannot be loaded (here: a key that does not match the leaf) leave the
    proxy on its last good certificate and bundle, logged once; before, every new connection
    raised ConfigError (a traceback per connection, inbound and outbound both down)."""
    web, api = pki.credentials("web"), pki.credentials("api")
    source = StaticCredentials(api)
    tls = MeshTls(source)
    assert tls.credentials is api  # contexts built from the good credentials
    source.update(MeshCredentials(api.identity, api.chain_pem, web.key_pem, api.bundle_pem))
    for _ in range(3):
        client = MeshTls(StaticCredentials(web)).client_session(api.identity)
        server = tls.server_session()
        pump(client, server)
        assert client.info is not None and client.info.peer_identity == api.identity
    assert tls.credentials is not source.current()
    refusals = [r for r in caplog.records if "cannot be used" in r.getMessage()]
    assert len(refusals) == 1 and "PRIVATE" not in refusals[0].getMessage()


_LOAD_WITH_TTY = """
import sys
from pathlib import Path
from proxy.meshtls import MeshCredentials, MeshTls, StaticCredentials
from proxy.errors import ProxyError
d = Path(sys.argv[1])
try:
    creds = MeshCredentials("web", *(d.joinpath(n).read_bytes() for n in ("c", "k", "b")))
    MeshTls(StaticCredentials(creds)).server_session()
except ProxyError as e:
    print("refused:", e)
"""


def test_an_encrypted_key_is_refused_without_a_passphrase_prompt(pki, tmp_path) -> None:
    """OpenSSL asks for a PEM pass phrase on the controlling terminal when none is given: a
    proxy started from a shell with an encrypted key hung there, event loop and all. The key
    is refused with a clear error instead, and nothing is asked on the terminal."""
    web = pki.credentials("web")
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, web.key_pem)
    with warnings.catch_warnings():  # pyOpenSSL's PEM writer is deprecated, and fine here
        warnings.simplefilter("ignore", DeprecationWarning)
        encrypted = crypto.dump_privatekey(
            crypto.FILETYPE_PEM, key, cipher="aes-256-cbc", passphrase=b"secret"
        )
    for name, data in (("c", web.chain_pem), ("k", encrypted), ("b", web.bundle_pem)):
        (tmp_path / name).write_bytes(data)
    master, slave = os.openpty()
    tty = os.ttyname(slave)

    def with_controlling_tty() -> None:
        os.setsid()
        os.close(os.open(tty, os.O_RDWR))  # a session leader opening a tty takes it

    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _LOAD_WITH_TTY, str(tmp_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=with_controlling_tty,
            cwd=Path(__file__).parents[2],
        )
        try:
            out, _ = proc.communicate(timeout=20)
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        os.set_blocking(master, False)
        try:
            asked = os.read(master, 4096)
        except OSError:  # EAGAIN: nothing was written to the terminal, or EIO: it is closed
            asked = b""
    finally:
        os.close(master)
        os.close(slave)
    assert b"pass phrase" not in asked
    assert b"refused: key_pem is an encrypted private key" in out, out
