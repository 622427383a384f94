"""pki test fixtures (defined in pki_testkit, which the test modules import by name)."""

from pki_testkit import chain, ecdsa_chain, live_mldsa_chain, mldsa_chain, tls_server

__all__ = ["chain", "ecdsa_chain", "live_mldsa_chain", "mldsa_chain", "tls_server"]
