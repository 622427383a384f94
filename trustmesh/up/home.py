"""The local PKI and runtime files of ``trustmesh up`` under ``$TRUSTMESH_HOME``.

The home is the same credential store ``trustmesh pki`` and ``trustmesh rotate`` use; ``up``
creates its anchor and issuer on first run and replaces an issuer that expired while nothing
was running. Runtime files live beside the store in ``<home>/up/``: the anchors PEM the proxies
start from, one workload token per service account (the embedded counterpart of a projected
ServiceAccount token, signed with the store's token key), and one log file per child.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from identity.validators import DEFAULT_AUDIENCE, sign_workload_token
from pki.rotation import init_anchor, issue_issuer
from pki.store import FileStore, write_file_atomic

TOKEN_TTL = timedelta(hours=24)
# Tokens are re-signed well before they expire, so a proxy renewing at any time holds a valid one.
TOKEN_REFRESH = timedelta(hours=12)


@dataclass(frozen=True, slots=True)
class Home:
    """Paths of one ``up`` home."""

    root: Path

    @property
    def store(self) -> FileStore:
        return FileStore(self.root)

    @property
    def run_dir(self) -> Path:
        return self.root / "up"

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def anchors(self) -> Path:
        return self.run_dir / "trust-anchors.pem"

    def token(self, namespace: str, service_account: str) -> Path:
        return self.run_dir / "tokens" / f"{namespace}.{service_account}.jwt"


def ensure_pki(home: Home, *, now: datetime) -> str:
    """Create the anchor and issuer when missing (or the issuer when expired); returns what
    was done, for the operator: ``created``, ``issuer replaced`` or ``existing``."""
    store = home.store
    home.root.mkdir(parents=True, exist_ok=True)
    os.chmod(home.root, 0o700)
    if store.current_version() is None or store.load().anchor is None:
        init_anchor(store, now=now)
        issue_issuer(store, now=now)
        action = "created"
    else:
        state = store.load()
        if state.issuer is None or not state.issuer.certificate.is_valid_at(now):
            issue_issuer(store, now=now, reason="issuer replaced by trustmesh up")
            action = "issuer replaced"
        else:
            action = "existing"
    home.run_dir.mkdir(parents=True, exist_ok=True)
    write_file_atomic(home.anchors, store.trust_bundle().pem())
    return action


def write_token(
    home: Home,
    namespace: str,
    service_account: str,
    *,
    now: datetime,
    ttl: timedelta = TOKEN_TTL,
    audience: str = DEFAULT_AUDIENCE,
) -> Path:
    """Sign a workload token for ``service_account`` and write it (0600) where its proxy reads it."""
    token = sign_workload_token(
        home.store, namespace, service_account, now=now, ttl=ttl, audience=audience
    )
    path = home.token(namespace, service_account)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_file_atomic(path, token + b"\n", mode=0o600)
    return path
