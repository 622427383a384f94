"""Identity test material: a real store with a token key, and request builders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from identity.client import IdentityClient, IdentityClientConfig
from identity.validators import DEFAULT_AUDIENCE, Domain, LocalTokenValidator
from pki import tokens
from pki.bundle import TrustBundle
from pki.certs import utcnow
from pki.csr import create_csr
from pki.keys import KeyAlgorithm, PrivateKey
from pki.names import Identity
from pki.rotation import init_anchor, issue_issuer
from pki.store import FileStore
from proxy.rpc import Channel

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

    def client(
        self,
        config: IdentityClientConfig | str,
        *,
        bundle: TrustBundle | None = None,
        **options: Any,
    ) -> IdentityClient:
        """The proxy's identity client, as the sidecar builds it: ``config`` (a bare target
        means certifying as ``identity()``), this store's tokens, and the store's bundle
        unless ``bundle`` is given; ``options`` go to IdentityClient (clock: ``utcnow``)."""
        if isinstance(config, str):
            config = IdentityClientConfig(config, identity())
        anchors = bundle if bundle is not None else self.store.load().require_bundle()
        options.setdefault("clock", utcnow)
        return IdentityClient(config, self.token, lambda: anchors, channels=Channel, **options)


def identity(sa: str = "web", ns: str = "default") -> str:
    return Identity(sa, ns, DOMAIN.control_plane_namespace, DOMAIN.trust_domain).dns_name


def csr_for(name: str, algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256) -> bytes:
    return create_csr(name, PrivateKey.generate(algorithm))


def make_env(root: Path, now: datetime, algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256) -> Env:
    store = FileStore(root)
    init_anchor(store, now=now, algorithm=algorithm)
    issue_issuer(store, now=now, algorithm=algorithm)
    return Env(store, tokens.token_signing_key(store, now=now), now)
