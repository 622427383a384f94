"""Assemble a running identity service from command-line options (``trustmesh identity serve``).

Chooses the issuer source, the token validator and the event sink, starts
:class:`~identity.server.IdentityServer` and runs it until ``stop`` is set.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from identity.errors import StartupError
from identity.issuer import bundle_from_pem
from identity.server import IdentityServer, ServerConfig, tune_gc
from identity.service import IssuancePolicy
from identity.sources import DirectorySource, IssuerSource, KubernetesSecretSource, StoreSource
from identity.validators import (
    Domain,
    KubernetesTokenValidator,
    LocalTokenValidator,
    TokenValidator,
)
from identity.watcher import EventRecorder, KubernetesEvents
from identity.workers import ValidatorSpec
from pki import tokens
from pki.certs import utcnow
from pki.keys import KeyAlgorithm
from pki.store import FileStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    store: Path | None = None
    issuer_dir: Path | None = None
    kubernetes: bool = False
    trust_anchors: Path | None = None
    listen: str = "127.0.0.1:8080"
    admin_listen: str | None = "127.0.0.1:9990"
    lifetime: timedelta = timedelta(hours=24)
    clock_skew: timedelta = timedelta(seconds=20)
    trust_domain: str = "cluster.local"
    control_plane_namespace: str = "trustmesh"
    token_validator: str = "local"
    token_audience: str = "identity.l5d.io"
    token_store: Path | None = None  # the local validator's key (default: the store)
    allowed_algorithms: tuple[KeyAlgorithm, ...] = (KeyAlgorithm.ECDSA_P256,)
    tls: bool = False
    workers: int = 1
    kubeconfig: Path | None = None
    reload_interval: float = 1.0

    def __post_init__(self) -> None:
        chosen = [self.store is not None, self.issuer_dir is not None, self.kubernetes]
        if sum(chosen) != 1:
            raise ValueError("exactly one issuer source is needed: store, issuer_dir or kubernetes")
        if self.token_validator not in ("local", "kubernetes"):
            raise ValueError(f"unknown token validator {self.token_validator!r}")
        if self.token_validator == "local" and self.store is None and self.token_store is None:
            raise ValueError("the local token validator needs a store that holds the token key")


def kubernetes_api_client(kubeconfig: Path | None) -> Any:
    """An ApiClient from ``kubeconfig``, else in-cluster config, else ~/.kube/config."""
    from kubernetes import client, config

    where = str(kubeconfig) if kubeconfig is not None else "in-cluster or ~/.kube/config"
    try:
        if kubeconfig is not None:
            return config.new_client_from_config(config_file=str(kubeconfig))
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            return config.new_client_from_config()
    except Exception as e:  # ConfigException, OSError, and TypeError etc. from a malformed file
        raise StartupError(
            f"cannot load the Kubernetes client configuration ({where}): {e}"
        ) from None


def build(options: ServeOptions) -> IdentityServer:
    """The server for ``options`` (not started)."""
    domain = Domain(options.control_plane_namespace, options.trust_domain)
    needs_api = options.kubernetes or options.token_validator == "kubernetes"
    api = kubernetes_api_client(options.kubeconfig) if needs_api else None
    events: EventRecorder | None = None
    if api is not None:
        events = KubernetesEvents(api, options.control_plane_namespace, clock=utcnow)

    source: IssuerSource
    if options.store is not None:
        source = StoreSource(FileStore(options.store))
    elif options.issuer_dir is not None:
        anchors = None
        if options.trust_anchors is not None:
            anchors = bundle_from_pem(
                options.trust_anchors.read_bytes(), source=str(options.trust_anchors)
            )
        source = DirectorySource(options.issuer_dir, anchors)
    else:
        secret_source = KubernetesSecretSource(api, options.control_plane_namespace)
        secret_source.start()
        source = secret_source

    validator: TokenValidator
    if options.token_validator == "local":
        key_store = options.token_store or options.store
        assert key_store is not None
        key = tokens.token_signing_key(FileStore(key_store), now=utcnow())
        validator = LocalTokenValidator(
            key,
            domain,
            clock=utcnow,
            audience=options.token_audience,
            leeway=options.clock_skew,
        )
        spec = ValidatorSpec("local", options.token_audience, local_key_pem=key.to_pem())
    else:
        validator = KubernetesTokenValidator(api, domain, audience=options.token_audience)
        spec = ValidatorSpec("kubernetes", options.token_audience, kubeconfig=options.kubeconfig)

    config = ServerConfig(
        domain=domain,
        policy=IssuancePolicy(
            lifetime=options.lifetime,
            clock_skew=options.clock_skew,
            allowed_algorithms=options.allowed_algorithms,
        ),
        listen=options.listen,
        admin_listen=options.admin_listen,
        tls=options.tls,
        reload_interval=options.reload_interval,
    )
    return IdentityServer(
        config,
        source,
        validator,
        clock=utcnow,
        events=events,
        workers=options.workers,
        worker_validator=spec,
    )


async def run(options: ServeOptions, stop: asyncio.Event) -> None:
    """Start the service, print where it listens, and serve until ``stop`` is set."""
    server = build(options)
    await server.start()
    tune_gc()
    print(
        f"identity: grpc {server.port} admin {server.admin_port} tls={options.tls}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await server.stop()
        source = server.watcher.source
        if isinstance(source, KubernetesSecretSource):
            source.stop()
