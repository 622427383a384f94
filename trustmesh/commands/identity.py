"""``trustmesh identity``: run the identity service, mint local workload tokens, and render the
cert-manager resources that keep a Kubernetes issuer fresh.

The commands parse flags and read the clock; every decision is made in ``identity`` and ``pki``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from pki.certs import utcnow
from pki.durations import format_duration
from pki.errors import PKIError
from pki.keys import KeyAlgorithm
from trustmesh.config import default_store_path, duration_option
from trustmesh.errors import EXIT_USAGE, CLIError


@click.group()
def identity() -> None:
    """Run and use the identity service (Linkerd-compatible Certify)."""


@identity.command()
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    help="FileStore directory (default: the TrustMesh home).",
)
@click.option(
    "--issuer-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Mounted issuer Secret (crt.pem/key.pem or tls.crt/tls.key/ca.crt).",
)
@click.option(
    "--kubernetes",
    "use_kubernetes",
    is_flag=True,
    help="Watch the issuer Secret through the Kubernetes API.",
)
@click.option(
    "--trust-anchors",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Trust anchors PEM (for --issuer-dir without ca.crt).",
)
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help="gRPC HOST:PORT.")
@click.option(
    "--admin-listen",
    default="127.0.0.1:9990",
    show_default=True,
    help="Admin HOST:PORT (/ready, /live, /metrics).",
)
@click.option("--issuance-lifetime", default="24h", show_default=True, callback=duration_option)
@click.option("--clock-skew", default="20s", show_default=True, callback=duration_option)
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--control-plane-namespace", default="trustmesh", show_default=True)
@click.option(
    "--token-validator",
    type=click.Choice(["local", "kubernetes"]),
    help="Default: local with a store, else kubernetes.",
)
@click.option("--token-audience", default="identity.l5d.io", show_default=True)
@click.option(
    "--token-store",
    type=click.Path(file_okay=False, path_type=Path),
    help="FileStore holding the local token key (default: --store, else the TrustMesh "
    "home): how --issuer-dir or --kubernetes pair with --token-validator local.",
)
@click.option(
    "--allowed-key-algorithms",
    default="ecdsa-p256",
    show_default=True,
    help="Comma-separated CSR key algorithms: ecdsa-p256, ml-dsa-65.",
)
@click.option(
    "--tls", is_flag=True, help="Serve gRPC over TLS with a certificate issued to itself."
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="gRPC processes sharing the port (SO_REUSEPORT).",
)
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Kubeconfig (default: in-cluster, else ~/.kube/config).",
)
@click.option(
    "--reload-interval",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.01, 60),
    help="Seconds between issuer checks.",
)
def serve(**opts: Any) -> None:
    """Serve io.linkerd.proxy.identity.Identity/Certify."""
    from identity.runner import ServeOptions, run

    sources = [opts["store"] is not None, opts["issuer_dir"] is not None, opts["use_kubernetes"]]
    if sum(sources) > 1:
        raise CLIError("choose one of --store, --issuer-dir and --kubernetes", EXIT_USAGE)
    try:
        algorithms = tuple(
            KeyAlgorithm.parse(a.strip())
            for a in opts["allowed_key_algorithms"].split(",")
            if a.strip()
        )
    except PKIError as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    from identity.service import IssuancePolicy

    try:  # checked here so that a window it could not issue is a usage error, before startup
        IssuancePolicy(opts["issuance_lifetime"], opts["clock_skew"], algorithms)
    except ValueError as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    store = opts["store"]
    if not any(sources):
        store = default_store_path()
    validator = opts["token_validator"] or ("local" if store is not None else "kubernetes")
    token_store = opts["token_store"]
    if token_store is not None and validator != "local":
        raise CLIError("--token-store is for --token-validator local", EXIT_USAGE)
    if validator == "local" and token_store is None:
        # The key 'trustmesh identity token' signs with: the same default store.
        token_store = store if store is not None else default_store_path()
    options = ServeOptions(
        store=store,
        token_store=token_store,
        issuer_dir=opts["issuer_dir"],
        kubernetes=opts["use_kubernetes"],
        trust_anchors=opts["trust_anchors"],
        listen=opts["listen"],
        admin_listen=opts["admin_listen"],
        lifetime=opts["issuance_lifetime"],
        clock_skew=opts["clock_skew"],
        trust_domain=opts["trust_domain"],
        control_plane_namespace=opts["control_plane_namespace"],
        token_validator=validator,
        token_audience=opts["token_audience"],
        allowed_algorithms=algorithms,
        tls=opts["tls"],
        workers=opts["workers"],
        kubeconfig=opts["kubeconfig"],
        reload_interval=opts["reload_interval"],
    )
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await run(options, stop)

    from identity.errors import IdentityError

    try:
        asyncio.run(main())
    except IdentityError as e:  # the issuer source, addresses, Kubernetes config: one line
        raise CLIError(str(e)) from None


MAX_TOKEN_TTL = timedelta(days=365)


@identity.command()
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    help="FileStore directory (default: the TrustMesh home).",
)
@click.option("--service-account", "-s", required=True)
@click.option("--namespace", "-n", required=True)
@click.option(
    "--ttl", default="24h", show_default=True, callback=duration_option, help="At most 365d."
)
@click.option("--audience", default="identity.l5d.io", show_default=True)
def token(
    store: Path | None, service_account: str, namespace: str, ttl: timedelta, audience: str
) -> None:
    """Print a signed workload token for SERVICE_ACCOUNT in NAMESPACE (local validator)."""
    from identity.validators import sign_workload_token
    from pki.names import check_label
    from pki.store import FileStore

    check_label("service account", service_account)
    check_label("namespace", namespace)
    if ttl <= timedelta(0):
        raise CLIError("--ttl must be positive", EXIT_USAGE)
    if ttl > MAX_TOKEN_TTL:
        # A token is a bearer credential for certificates of its service account until it
        # expires: as long as a Kubernetes extended service-account token, no longer.
        raise CLIError(
            f"--ttl {format_duration(ttl)} is longer than {format_duration(MAX_TOKEN_TTL)}: "
            "mint a fresh token when this one nears expiry",
            EXIT_USAGE,
        )
    now = utcnow()
    token = sign_workload_token(
        FileStore(store or default_store_path()),
        namespace,
        service_account,
        now=now,
        ttl=ttl,
        audience=audience,
    )
    click.echo(token.decode())


@identity.command("cert-manager-manifests")
@click.option(
    "--namespace", default="trustmesh", show_default=True, help="Control-plane namespace."
)
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option(
    "--trust-namespace",
    default="cert-manager",
    show_default=True,
    help="trust-manager's trust namespace (holds the anchor Secret).",
)
def cert_manager_manifests(namespace: str, trust_domain: str, trust_namespace: str) -> None:
    """Render the cert-manager ClusterIssuer, issuer Certificate and trust-manager Bundle."""
    from identity.certmanager import CertManagerOptions, render

    click.echo(render(CertManagerOptions(namespace, trust_domain, trust_namespace)), nl=False)
