"""``trustmesh proxy run``: one sidecar proxy fed by the identity and destination services.

Every flag has an environment variable ``TRUSTMESH_PROXY_<FLAG>`` (shown in ``--help``), so a
container spec or ``trustmesh up`` can configure it either way; a flag wins over its variable.
Once serving, one JSON line with the bound ports is printed on stdout (ports 0 pick free ones).

Once its flags check out, the command replaces itself (same PID) with the sidecar's own process,
:mod:`trustmesh.up.sidecar_process`, which does not load click or the rest of the CLI.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from proxy.policy import DefaultPolicy
from proxy.settings import DETECT_TIMEOUT, HEAD_TIMEOUT, SHUTDOWN_GRACE
from trustmesh.errors import EXIT_USAGE, CLIError
from trustmesh.up.sidecar_config import SidecarConfig, parse_listen, parse_upstream

ENV = "TRUSTMESH_PROXY_"


def _control_plane_addr(value: str, flag: str) -> str:
    """``value`` if it names a server: HOST:PORT, or a gRPC target with its scheme. A bare
    host was taken as a gRPC target on port 443 and retried for ever with warnings."""
    from proxy.settings import parse_target

    try:
        parse_target(value)
    except ValueError as e:
        raise ValueError(f"{flag} {e} (or a gRPC target such as dns:///HOST:PORT)") from None
    return value


def _split(values: tuple[str, ...]) -> list[str]:
    return [v for value in values for v in value.split(",") if v.strip()]


def _opt(name: str, *decls: str, **kw: Any) -> Any:
    env = ENV + name.lstrip("-").replace("-", "_").upper()
    return click.option(name, *decls, envvar=kw.pop("envvar", env), show_envvar=True, **kw)


@click.group()
def proxy() -> None:
    """Run the sidecar proxy."""


@proxy.command()
@_opt("--workload", required=True, help="Workload (pod) name, as in the mesh file.")
@_opt("--namespace", default="default", show_default=True)
@_opt("--service-account", default="default", show_default=True, help="Identity to certify as.")
@_opt(
    "--token-file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Workload token for Certify (re-read on every renewal).",
)
@_opt(
    "--trust-anchors",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Trust anchors PEM: trusts the control plane, and the mesh until destination streams one.",
)
@_opt(
    "--trust-bundle-from",
    type=click.Choice(["destination", "file"]),
    default="destination",
    show_default=True,
    help="Follow the destination's trust-bundle stream, or watch the anchors file.",
)
@_opt("--identity-addr", default="127.0.0.1:8080", show_default=True)
@_opt("--identity-name", help="TLS name of the identity service (default: trustmesh-identity.…).")
@_opt("--destination-addr", default="127.0.0.1:8086", show_default=True)
@_opt(
    "--destination-name",
    help="TLS name of the destination service (default: trustmesh-destination.…).",
)
@_opt(
    "--control-plane-plaintext", is_flag=True, help="Talk to identity and destination without TLS."
)
@_opt("--outbound-listen", default="127.0.0.1:4140", show_default=True)
@_opt("--inbound-listen", default="0.0.0.0:4143", show_default=True)
@_opt(
    "--admin-listen", default="127.0.0.1:4191", show_default=True, help="/metrics, /ready, /live."
)
@_opt(
    "--upstream",
    "upstreams",
    multiple=True,
    envvar=ENV + "UPSTREAMS",
    help="LOCAL_ADDR=SERVICE_AUTHORITY, e.g. 127.0.0.1:24001=api.shop.svc.cluster.local:8080 (repeatable).",
)
@_opt("--app-host", default="127.0.0.1", show_default=True, help="Where the application listens.")
@_opt(
    "--app-port",
    "app_ports",
    multiple=True,
    type=int,
    envvar=ENV + "APP_PORTS",
    help="Application port (repeatable); the first one also takes connections without a transport header.",
)
@_opt(
    "--kex",
    type=click.Choice(["hybrid-required", "hybrid-preferred"]),
    default="hybrid-required",
    show_default=True,
)
@_opt(
    "--default-inbound-policy",
    type=click.Choice([p.value for p in DefaultPolicy]),
    default="all-unauthenticated",
    show_default=True,
    help="For ports destination has not described (yet).",
)
@_opt(
    "--detect-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DETECT_TIMEOUT,
    show_default=True,
    help="Seconds a silent client may take to send its first bytes before the connection is "
    "treated as opaque TCP.",
)
@_opt(
    "--head-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=HEAD_TIMEOUT,
    show_default=True,
    help="Seconds a started HTTP/1 request head may take to complete (then 408).",
)
@_opt(
    "--shutdown-grace",
    type=click.FloatRange(min=0),
    default=SHUTDOWN_GRACE,
    show_default=True,
    help="Seconds to drain on SIGTERM: no new connections, each client connection closed "
    "once its request in progress is answered, the rest cut after this.",
)
@_opt("--trust-domain", default="cluster.local", show_default=True)
@_opt("--control-plane-namespace", default="trustmesh", show_default=True)
@_opt("--cluster-domain", default="cluster.local", show_default=True)
@_opt("--log-level", default="info", show_default=True)
def run(**o: Any) -> None:
    """Run one proxy until SIGINT/SIGTERM (exit 0); serves nothing before its first certificate."""
    from pki.names import control_plane_identity
    from proxy.settings import KexPolicy, Listen
    from trustmesh.up.sidecar_process import exec_sidecar

    logging.basicConfig(
        level=o["log_level"].upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    names: dict[str, str | None] = {}
    for component in ("identity", "destination"):
        given = o[f"{component}_name"]
        if o["control_plane_plaintext"]:
            names[component] = None
        else:
            names[component] = (
                given
                or control_plane_identity(
                    component,
                    control_plane_namespace=o["control_plane_namespace"],
                    trust_domain=o["trust_domain"],
                ).dns_name
            )
    try:
        upstreams = tuple(
            (Listen(*local), authority)
            for local, authority in (parse_upstream(u) for u in _split(o["upstreams"]))
        )
        config = SidecarConfig(
            namespace=o["namespace"],
            workload=o["workload"],
            service_account=o["service_account"],
            token_file=o["token_file"],
            trust_anchors=o["trust_anchors"],
            identity_addr=_control_plane_addr(o["identity_addr"], "--identity-addr"),
            identity_name=names["identity"],
            destination_addr=_control_plane_addr(o["destination_addr"], "--destination-addr"),
            destination_name=names["destination"],
            outbound=Listen(*parse_listen(o["outbound_listen"], "--outbound-listen")),
            inbound=Listen(*parse_listen(o["inbound_listen"], "--inbound-listen")),
            admin=Listen(*parse_listen(o["admin_listen"], "--admin-listen")),
            upstreams=upstreams,
            app_host=o["app_host"],
            app_ports=tuple(o["app_ports"]),
            kex=KexPolicy(o["kex"]),
            default_inbound_policy=DefaultPolicy(o["default_inbound_policy"]),
            bundle_from=o["trust_bundle_from"],
            trust_domain=o["trust_domain"],
            control_plane_namespace=o["control_plane_namespace"],
            cluster_domain=o["cluster_domain"],
            detect_timeout=o["detect_timeout"],
            head_timeout=o["head_timeout"],
            shutdown_grace=o["shutdown_grace"],
        )
        config.identity  # noqa: B018 - validates service account, trust domain and namespace
    except ValueError as e:
        raise CLIError(str(e), EXIT_USAGE) from None

    # The flags are good: become the sidecar's own process, which does not load the CLI.
    exec_sidecar(config, o["log_level"])
