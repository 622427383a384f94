"""The server's own TLS certificate, issued from the credential store and renewed in place.

The destination service presents ``trustmesh-destination.<cp-ns>.serviceaccount.identity.<cp-ns>.
<td>``. gRPC asks :func:`server_credentials`' fetcher for the certificate on each new connection;
the fetcher re-issues once 70% of the certificate's life has passed, so a long-running server
never serves an expired certificate and existing connections are not disturbed.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc

from destination.resources import MeshSettings
from pki.certs import Credential, issue_identity, utcnow
from pki.keys import PrivateKey
from pki.names import control_plane_identity
from pki.store import FileStore
from pki.verify import anchor_for

RENEW_AT = 0.7


def issue_server_credential(store: FileStore, settings: MeshSettings) -> Credential:
    identity = control_plane_identity(
        "destination",
        control_plane_namespace=settings.control_plane_namespace,
        trust_domain=settings.trust_domain,
    )
    issuer = store.issuer()
    anchor = anchor_for(issuer.full_chain, store.trust_bundle())
    return issue_identity(identity, PrivateKey.generate(), issuer, now=utcnow(), anchor=anchor)


def server_credentials(directory: Path, settings: MeshSettings) -> grpc.ServerCredentials:
    store = FileStore(directory)
    lock = threading.Lock()
    current = issue_server_credential(store, settings)

    def config(cred: Credential) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(cred.key.to_pem(), cred.chain_pem())],
            root_certificates=store.trust_bundle().pem(),
        )

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal current
        with lock:
            cert = current.certificate
            renew_at = cert.not_before + (cert.not_after - cert.not_before) * RENEW_AT
            if utcnow() < renew_at:
                return None  # keep the current configuration
            current = issue_server_credential(store, settings)
            return config(current)

    return grpc.dynamic_ssl_server_credentials(
        config(current), fetch, require_client_authentication=False
    )
