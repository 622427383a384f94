"""Identity test material: a real store with a token key, and request builders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from identity.validators import DEFAULT_AUDIENCE, Domain, LocalTokenValidator
from pki import tokens
from pki.csr import create_csr
from pki.keys import KeyAlgorithm, PrivateKey
from pki.names import Identity
from pki.rotation import init_anchor, issue_issuer
from pki.store import FileStore

DOMAIN = Domain("trustmesh", "cluster.local")


@dataclass
class Env:
    """A store with anchor, issuer and token key, all valid around ``now``."""

    store: FileStore
    token_key: PrivateKey
    now: datetime

    def token(
        self,
        sa: str = "web",
        ns: str = "default",
        *,
        audience: str = DEFAULT_AUDIENCE,
        issued: datetime | None = None,
        ttl: timedelta = timedelta(hours=1),
        key: PrivateKey | None = None,
        issuer: str = tokens.DEFAULT_TOKEN_ISSUER,
    ) -> bytes:
        at = (issued or self.now).replace(microsecond=0)
        claims = tokens.TokenClaims(
            f"system:serviceaccount:{ns}:{sa}", audience, at, at + ttl, issuer=issuer
        )
        return tokens.sign_token(claims, key or self.token_key)

    def validator(self, clock: Callable[[], datetime] | None = None) -> LocalTokenValidator:
        return LocalTokenValidator(self.token_key, DOMAIN, clock=clock or (lambda: self.now))


def identity(sa: str = "web", ns: str = "default") -> str:
    return Identity(sa, ns, DOMAIN.control_plane_namespace, DOMAIN.trust_domain).dns_name


def csr_for(name: str, algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256) -> bytes:
    return create_csr(name, PrivateKey.generate(algorithm))


def make_env(root: Path, now: datetime, algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256) -> Env:
    store = FileStore(root)
    init_anchor(store, now=now, algorithm=algorithm)
    issue_issuer(store, now=now, algorithm=algorithm)
    return Env(store, tokens.token_signing_key(store, now=now), now)
