"""What ``trustmesh up`` runs for a mesh file: one proxy (and optionally one application) per
meshed Workload, described by the Workload itself and a few ``up.trustmesh.io/*`` annotations.

=================================  ==============================================================
``spec.serviceAccount``            the identity the proxy certifies as
``spec.inboundProxyPort``          the proxy's inbound port (a Workload without it is not meshed:
                                   only its application runs)
``spec.ports``                     the application's ports (policy is watched for each one)
``up.trustmesh.io/command``        the application's command line (shell syntax; ``{python}`` is
                                   this interpreter); absent: the application runs elsewhere
``up.trustmesh.io/upstreams``      ``LOCAL_ADDR=SERVICE_AUTHORITY`` pairs, comma-separated: local
                                   ports through which the application reaches mesh services
``up.trustmesh.io/admin-port``     the proxy's admin port (default: a free port)
``up.trustmesh.io/outbound-port``  the proxy's outbound port (default: a free port)
=================================  ==============================================================

Planning is pure: the caller passes the free ports to use.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from destination.resources import ClusterState, Workload
from pki.names import port_number
from trustmesh.up.sidecar_config import HOST, parse_upstream

ANNOTATION = "up.trustmesh.io/"


class PlanError(ValueError):
    """A Workload's ``up`` annotations are invalid (the message names the workload and field)."""


@dataclass(frozen=True, slots=True)
class WorkloadPlan:
    """One workload as ``up`` runs it."""

    namespace: str
    name: str
    service_account: str
    inbound_port: int | None  # None: not meshed (application only)
    app_ports: tuple[int, ...]
    command: tuple[str, ...]  # empty: no application process
    upstreams: tuple[tuple[str, int, str], ...]  # (host, port, service authority)
    admin_port: int | None = None
    outbound_port: int | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def meshed(self) -> bool:
        return self.inbound_port is not None


def _port(workload: Workload, key: str, free: Iterator[int]) -> int:
    raw = workload.meta.annotation(ANNOTATION + key)
    if raw is None:
        return next(free)
    port = port_number(raw.strip())
    if port is None:
        raise PlanError(
            f"workload {workload.meta.namespace}/{workload.meta.name}: annotation "
            f"{ANNOTATION}{key} {raw!r} is not a port number"
        )
    return port


def plan_workload(workload: Workload, free: Iterator[int]) -> WorkloadPlan:
    meta = workload.meta
    where = f"workload {meta.namespace}/{meta.name}"
    command_text = meta.annotation(ANNOTATION + "command")
    try:
        command = tuple(
            arg.replace("{python}", sys.executable) for arg in shlex.split(command_text or "")
        )
    except ValueError as e:
        raise PlanError(f"{where}: annotation {ANNOTATION}command does not parse: {e}") from None
    upstreams = []
    for item in (meta.annotation(ANNOTATION + "upstreams") or "").split(","):
        if not item.strip():
            continue
        try:
            (host, port), authority = parse_upstream(item)
        except ValueError as e:
            raise PlanError(f"{where}: annotation {ANNOTATION}upstreams: {e}") from None
        upstreams.append((host, port, authority))
    meshed = workload.inbound_proxy_port is not None
    if upstreams and not meshed:
        raise PlanError(f"{where}: upstreams need a proxy; set spec.inboundProxyPort")
    return WorkloadPlan(
        namespace=meta.namespace,
        name=meta.name,
        service_account=workload.service_account,
        inbound_port=workload.inbound_proxy_port,
        app_ports=tuple(p.port for p in workload.ports),
        command=command,
        upstreams=tuple(upstreams),
        admin_port=_port(workload, "admin-port", free) if meshed else None,
        outbound_port=_port(workload, "outbound-port", free) if meshed else None,
    )


def plan_mesh(state: ClusterState, free: Iterator[int]) -> tuple[WorkloadPlan, ...]:
    """Every workload of the mesh file, in file order (``free`` supplies unset ports)."""
    return tuple(plan_workload(w, free) for w in state.workloads)


def listen_ports(
    plans: Iterable[WorkloadPlan], *, apps: bool = True, proxies: bool = True
) -> list[tuple[str, int, str]]:
    """Every (host, port, what) that ``up``'s children will listen on: each proxy's inbound,
    outbound, admin and upstream listeners, and the ports of the applications ``up`` starts
    (an application without a command runs elsewhere; its ports are its own business).
    ``apps``/``proxies`` False leave out the applications' or the proxies' ports."""
    found: list[tuple[str, int, str]] = []
    for plan in plans:
        if plan.command and apps:
            found += [(HOST, port, f"application port of {plan.key}") for port in plan.app_ports]
        if plan.meshed and proxies:
            for what, port in (
                ("inbound", plan.inbound_port),
                ("outbound", plan.outbound_port),
                ("admin", plan.admin_port),
            ):
                if port:
                    found.append((HOST, port, f"proxy {what} port of {plan.key}"))
            found += [
                (h, p, f"upstream listener of {plan.key} for {a}") for h, p, a in plan.upstreams
            ]
    return found


def named_ports(plans: Sequence[WorkloadPlan]) -> set[int]:
    """The ports a mesh file names itself; ports ``up`` picks must not collide with them.

    Plan with ``itertools.repeat(0)`` to see only the named ones (0 is "not chosen yet").
    """
    named = {port for _, port, _ in listen_ports(plans)}
    named.update(port for plan in plans for port in plan.app_ports)
    named.discard(0)
    return named


@dataclass(frozen=True, slots=True)
class ControlPlane:
    """Where the control plane listens, and what its proxies must trust."""

    identity_addr: str
    destination_addr: str
    trust_domain: str = "cluster.local"
    control_plane_namespace: str = "trustmesh"


def proxy_args(
    plan: WorkloadPlan,
    control: ControlPlane,
    *,
    token_file: str,
    anchors: str,
    kex: str,
) -> tuple[str, ...]:
    """``trustmesh proxy run`` arguments for ``plan`` (a meshed workload)."""
    if plan.inbound_port is None:
        raise PlanError(f"workload {plan.key} is not meshed")
    args = [
        "proxy", "run",
        "--workload", plan.name,
        "--namespace", plan.namespace,
        "--service-account", plan.service_account,
        "--token-file", token_file,
        "--trust-anchors", anchors,
        "--identity-addr", control.identity_addr,
        "--destination-addr", control.destination_addr,
        "--trust-domain", control.trust_domain,
        "--control-plane-namespace", control.control_plane_namespace,
        "--inbound-listen", f"{HOST}:{plan.inbound_port}",
        "--outbound-listen", f"{HOST}:{plan.outbound_port}",
        "--admin-listen", f"{HOST}:{plan.admin_port}",
        "--kex", kex,
    ]  # fmt: skip
    for port in plan.app_ports:
        args += ["--app-port", str(port)]
    for host, port, authority in plan.upstreams:
        args += ["--upstream", f"{host}:{port}={authority}"]
    return tuple(args)
