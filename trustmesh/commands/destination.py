"""``trustmesh destination``: run the destination service, validate mesh files."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
from pathlib import Path

import click

from trustmesh.errors import CLIError

EXIT_INVALID_MESH_FILE = 3


@click.group()
def destination() -> None:
    """Service discovery and policy for proxies."""


@destination.command()
@click.option(
    "--mesh-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Mesh file (YAML) to serve and watch.",
)
@click.option("--kubernetes", is_flag=True, help="Watch the Kubernetes API instead of a mesh file.")
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Kubeconfig (default: in-cluster, then ~/.kube/config).",
)
@click.option("--listen", default="127.0.0.1:8086", show_default=True, help="gRPC address.")
@click.option(
    "--admin-listen", default="127.0.0.1:9996", show_default=True, help="/ready, /live, /metrics."
)
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--control-plane-namespace", default="trustmesh", show_default=True)
@click.option("--cluster-domain", default="cluster.local", show_default=True)
@click.option(
    "--default-inbound-policy",
    default="all-unauthenticated",
    show_default=True,
    help="all-unauthenticated | all-authenticated | cluster-unauthenticated | cluster-authenticated | deny | audit",
)
@click.option("--tls", is_flag=True, help="Serve TLS with a certificate issued from --store.")
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    help="Credential store (issuer, trust bundle).",
)
@click.option(
    "--trust-bundle",
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM anchors to stream (default: the store's; with --kubernetes and no --store, the "
    "watched ConfigMap trustmesh-identity-trust-roots in the control-plane namespace).",
)
@click.option("--log-level", default="info", show_default=True)
def serve(
    mesh_file: Path | None,
    kubernetes: bool,
    kubeconfig: Path | None,
    listen: str,
    admin_listen: str,
    trust_domain: str,
    control_plane_namespace: str,
    cluster_domain: str,
    default_inbound_policy: str,
    tls: bool,
    store: Path | None,
    trust_bundle: Path | None,
    log_level: str,
) -> None:
    """Run the destination service until SIGTERM/SIGINT."""
    from destination.errors import DestinationError, StartupError
    from destination.resources import MeshSettings
    from destination.service import DestinationServer, ServeOptions
    from pki.names import check_label, check_trust_domain

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if (mesh_file is None) == (not kubernetes):
        raise click.UsageError("give exactly one of --mesh-file FILE or --kubernetes")
    if tls and store is None:
        raise click.UsageError("--tls needs --store DIR")
    check_label("control-plane namespace", control_plane_namespace)
    check_trust_domain(trust_domain)
    settings = MeshSettings(
        trust_domain, control_plane_namespace, cluster_domain, default_inbound_policy
    )
    options = ServeOptions(
        listen, admin_listen, settings, mesh_file, kubernetes, store, tls, trust_bundle
    )
    kube_api = None
    if kubernetes:
        from destination.kubernetes import api_client

        kube_api = api_client(kubeconfig)

    async def run() -> None:
        server = DestinationServer(options, kube_api=kube_api)
        try:
            await server.start()
        except StartupError as e:
            raise CLIError(str(e)) from None
        except DestinationError as e:
            raise CLIError(str(e), EXIT_INVALID_MESH_FILE) from None
        # Everything loaded so far lives for the whole run: keep it out of the cyclic GC's
        # generations, so that a full collection does not stall a fan-out to 1,000 streams.
        gc.freeze()
        loop = asyncio.get_running_loop()
        stopping: set[asyncio.Future[None]] = set()  # the loop keeps only weak references

        def stop() -> None:
            stopping.add(asyncio.ensure_future(server.stop()))

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop)
        click.echo(
            f"destination service listening on {listen.rsplit(':', 1)[0]}:{server.port} "
            f"(admin :{server.admin_port})",
            err=True,
        )
        await server.wait_stopped()
        await server.stop()

    try:
        import uvloop  # optional: a faster event loop for the fan-out
    except ImportError:
        asyncio.run(run())
    else:
        uvloop.run(run())


@destination.command()
@click.argument("mesh_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def check(mesh_file: Path, output: str) -> None:
    """Validate a mesh file; exit 3 with the document and field at fault when invalid."""
    from destination.errors import DestinationError
    from destination.meshfile import load_mesh_text

    try:
        state = load_mesh_text(mesh_file.read_text(encoding="utf-8"), str(mesh_file))
    except DestinationError as e:
        if output == "json":
            click.echo(json.dumps({"valid": False, "error": str(e)}))
            raise SystemExit(EXIT_INVALID_MESH_FILE) from None
        raise CLIError(str(e), EXIT_INVALID_MESH_FILE) from None
    counts = {
        "Workload": len(state.workloads),
        "Service": len(state.services),
        "Server": len(state.servers),
        "AuthorizationPolicy": len(state.authorization_policies),
        "MeshTLSAuthentication": len(state.mesh_tls),
        "NetworkAuthentication": len(state.network_authentications),
        "HTTPRoute": len(state.http_routes),
    }
    if output == "json":
        click.echo(json.dumps({"valid": True, "resources": counts}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{mesh_file}: valid")
    table.add_column("KIND")
    table.add_column("COUNT", justify="right")
    for kind, n in counts.items():
        table.add_row(kind, str(n))
    Console().print(table)
