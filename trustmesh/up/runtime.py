"""``trustmesh up``: the local PKI, the control plane with TLS, and the workloads of a mesh file
as supervised child processes.

Start order: the mesh file is read and planned, and every port the children will listen on is
checked free (so a bad file or a busy port is refused before anything is created), then the PKI
(first run only), identity and destination side by side (each until its admin
``/ready``), then every application and proxy side by side (applications until they accept,
proxies until ``/ready``, which a proxy reaches only with a certificate). Stop is the
supervisor's: SIGTERM in reverse start order, SIGKILL after a grace period.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from destination.errors import DestinationError, InvalidMeshFile
from destination.meshfile import load_mesh_text
from destination.resources import ClusterState
from pki.errors import PKIError
from trustmesh.rotation_job import ExitCode, run_once
from trustmesh.supervisor import (
    ChildSpec,
    ReadyCheck,
    Supervisor,
    SupervisorError,
    free_ports,
    trustmesh_argv,
)
from trustmesh.up.home import TOKEN_REFRESH, Home, ensure_pki, sync_anchors, write_token
from trustmesh.up.plan import (
    HOST,
    ControlPlane,
    PlanError,
    WorkloadPlan,
    listen_ports,
    named_ports,
    plan_mesh,
    proxy_args,
)

CHILD_ENV = {"PYTHONUNBUFFERED": "1"}


# How often a running 'up' checks whether the issuer is due (the renewal point is hours away).
ISSUER_CHECK = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class UpOptions:
    mesh_file: Path
    home: Path
    kex: str = "hybrid-required"
    issuance_lifetime: str | None = None  # identity --issuance-lifetime (default 24h)
    ready_timeout: float = 60.0
    trust_domain: str = "cluster.local"
    control_plane_namespace: str = "trustmesh"

    def __post_init__(self) -> None:
        if self.kex not in ("hybrid-required", "hybrid-preferred"):
            raise ValueError(f"kex {self.kex!r} is not hybrid-required or hybrid-preferred")
        if self.ready_timeout <= 0:
            raise ValueError("ready_timeout must be positive")


def check_ports_free(ports: Sequence[tuple[str, int, str]]) -> None:
    """Raise SupervisorError naming the first (host, port, what) that something already
    listens on: a child would only fail on it later, and an application's readiness check
    (a TCP accept) would even take the other listener for the application."""
    for host, port, what in ports:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no conflict
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise SupervisorError(
                        f"{host}:{port} ({what}) is already in use; stop what listens there "
                        "or change the mesh file"
                    ) from None
                raise SupervisorError(
                    f"cannot listen on {host}:{port} ({what}): {e.strerror}"
                ) from None


def start_all(supervisor: Supervisor, specs: Sequence[ChildSpec], timeout: float) -> None:
    """Start ``specs`` at once and wait until each is ready (their ``ready`` checks), failing
    fast, with the child's log file named, when one exits or the deadline passes."""
    first = len(supervisor.children)
    for spec in specs:
        supervisor.start(dataclasses.replace(spec, ready=None))
    children = supervisor.children[first:]
    waiting = {c.spec.name: spec for c, spec in zip(children, specs, strict=True)}
    deadline = time.monotonic() + timeout
    while waiting:
        for child in children:
            name = child.spec.name
            if name not in waiting:
                continue
            if child.proc.poll() is not None:
                raise SupervisorError(supervisor.failure(child, "while starting"))
            check = waiting[name].ready
            if check is None or check():
                del waiting[name]
        if waiting and time.monotonic() > deadline:
            names = ", ".join(sorted(waiting))
            raise SupervisorError(
                f"not ready within {timeout:.0f}s: {names}; see the logs in {supervisor.log_dir}"
            )
        if waiting:
            time.sleep(0.05)


class Mesh:
    """The running embedded mesh (owned by a :class:`Supervisor`)."""

    def __init__(self, options: UpOptions, supervisor: Supervisor) -> None:
        self.options = options
        self.supervisor = supervisor
        self.home = Home(options.home)
        self.plans: tuple[WorkloadPlan, ...] = ()
        self.control: ControlPlane | None = None
        self.admin: dict[str, str] = {}  # component or workload key -> admin HOST:PORT
        self.pki_action = ""
        self._tokens_at: datetime | None = None
        self._issuer_checked_at: datetime | None = None
        self._store_version: int | None = None  # the store version the anchors file follows
        self._said: set[str] = set()  # problems already reported: each is said once
        self._control_ports: tuple[int, int, int, int] = (0, 0, 0, 0)
        # The mesh file as planned at start (ports up chooses left 0), and its stat then.
        self._drafts: dict[str, WorkloadPlan] = {}
        self._mesh_stat: tuple[int, int, int] | None = None

    def prepare(self) -> None:
        """Read and plan the mesh file, check its listen ports, choose the free ones (no file
        or process is created). Raises InvalidMeshFile, PlanError or SupervisorError."""
        self._mesh_stat = self._stat_mesh_file()
        state, drafts = self._read_mesh()
        self._drafts = {d.key: d for d in drafts}
        check_ports_free(listen_ports(drafts))
        # The ports chosen here must not be ones the file names (the demo mesh names all of
        # its own, chosen free a moment before): a collision only shows once a child is up.
        named = named_ports(drafts)
        meshed = sum(1 for p in drafts if p.meshed)
        ports = [p for p in free_ports(4 + 2 * meshed + len(named)) if p not in named]
        self._control_ports = (ports[0], ports[1], ports[2], ports[3])
        self.plans = plan_mesh(state, iter(ports[4:]))

    def start(self, now: datetime, progress: Callable[[str], None] = lambda _: None) -> None:
        o = self.options
        self.prepare()
        id_port, id_admin, dst_port, dst_admin = self._control_ports
        self.pki_action = ensure_pki(self.home, now=now)
        progress(f"local PKI in {self.home.root}: {self.pki_action}")
        self.control = ControlPlane(
            f"{HOST}:{id_port}", f"{HOST}:{dst_port}", o.trust_domain, o.control_plane_namespace
        )
        self.refresh_tokens(now)
        identity = [
            "identity", "serve", "--tls", "--store", str(self.home.root),
            "--listen", self.control.identity_addr, "--admin-listen", f"{HOST}:{id_admin}",
            "--trust-domain", o.trust_domain,
            "--control-plane-namespace", o.control_plane_namespace,
        ]  # fmt: skip
        if o.issuance_lifetime is not None:
            identity += ["--issuance-lifetime", o.issuance_lifetime]
        destination = [
            "destination", "serve", "--tls", "--store", str(self.home.root),
            "--mesh-file", str(o.mesh_file),
            "--listen", self.control.destination_addr, "--admin-listen", f"{HOST}:{dst_admin}",
            "--trust-domain", o.trust_domain,
            "--control-plane-namespace", o.control_plane_namespace,
        ]  # fmt: skip
        self.admin = {"identity": f"{HOST}:{id_admin}", "destination": f"{HOST}:{dst_admin}"}
        progress("starting identity and destination (TLS)")
        start_all(
            self.supervisor,
            [
                ChildSpec(
                    "identity",
                    trustmesh_argv(*identity),
                    ReadyCheck((HOST, id_admin)),
                    CHILD_ENV,
                ),
                ChildSpec(
                    "destination",
                    trustmesh_argv(*destination),
                    ReadyCheck((HOST, dst_admin)),
                    CHILD_ENV,
                ),
            ],
            o.ready_timeout,
        )
        progress(f"starting {len(self.plans)} workloads")
        start_all(self.supervisor, self._workload_specs(), o.ready_timeout)

    def _workload_specs(self) -> list[ChildSpec]:
        assert self.control is not None
        specs = []
        for plan in self.plans:
            slug = f"{plan.namespace}-{plan.name}"
            if plan.command:
                ready = ReadyCheck((HOST, plan.app_ports[0]), None) if plan.app_ports else None
                specs.append(ChildSpec(f"app-{slug}", plan.command, ready, CHILD_ENV))
            if plan.meshed:
                args = proxy_args(
                    plan,
                    self.control,
                    token_file=str(self.home.token(plan.namespace, plan.service_account)),
                    anchors=str(self.home.anchors),
                    kex=self.options.kex,
                )
                assert plan.admin_port is not None
                self.admin[plan.key] = f"{HOST}:{plan.admin_port}"
                specs.append(
                    ChildSpec(
                        f"proxy-{slug}",
                        trustmesh_argv(*args),
                        ReadyCheck((HOST, plan.admin_port)),
                        CHILD_ENV,
                    )
                )
        return specs

    def refresh_tokens(self, now: datetime) -> bool:
        """Re-sign every workload token when due (the first call always signs); True if done."""
        if self._tokens_at is not None and now - self._tokens_at < TOKEN_REFRESH:
            return False
        accounts = {(p.namespace, p.service_account) for p in self.plans if p.meshed}
        for namespace, service_account in sorted(accounts):
            write_token(self.home, namespace, service_account, now=now)
        self._tokens_at = now
        return True

    def renew_issuer(self, now: datetime) -> list[str]:
        """The rotation job, run by ``up`` itself once a minute: the issuer (48 h) is renewed
        when due, as ``trustmesh rotate`` from cron would, so a mesh left up for days keeps
        certifying. The identity service picks the new issuer up from the store. Returns what
        to tell the user: a renewal, and once each, a failure or a human action (an anchor
        near its end)."""
        if self._issuer_checked_at is not None and now - self._issuer_checked_at < ISSUER_CHECK:
            return []
        self._issuer_checked_at = now
        report = run_once(self.home.store, now=now)
        if report.exit_code is ExitCode.LOCKED:
            return []  # a 'trustmesh rotate' of the user's holds the store: it does the work
        said: list[str] = []
        if report.new_state is not None:
            issuer = report.new_state.require_issuer().certificate
            said.append(
                f"issuer renewed: {issuer.fingerprint[:16]} until {issuer.not_after:%Y-%m-%d %H:%M} UTC"
            )
        problems = [f"issuer renewal failed: {report.error}"] if report.error else []
        problems += [f"action needed: {a}" for a in report.human_actions]
        return said + self._once(problems)

    def _read_mesh(self) -> tuple[ClusterState, tuple[WorkloadPlan, ...]]:
        """The mesh file read, and planned with the ports ``up`` chooses left 0. Raises
        InvalidMeshFile or PlanError."""
        path = self.options.mesh_file
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidMeshFile(f"{path}: not UTF-8 text") from None
        state = load_mesh_text(text, str(path))
        try:
            return state, plan_mesh(state, itertools.repeat(0))  # 0: a port up will choose
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None

    def _stat_mesh_file(self) -> tuple[int, int, int] | None:
        try:
            st = self.options.mesh_file.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def mesh_file_changes(self) -> list[str]:
        """What to tell the user when the mesh file changed while ``up`` runs (cheap when it
        did not: one stat). Destination applies a valid change at once (endpoints, routes,
        policy), but ``up`` starts and stops processes only when it starts, so workloads
        added, removed or changed need a restart of ``up``: say which. Each message once."""
        seen = self._stat_mesh_file()
        if seen == self._mesh_stat:
            return []
        self._mesh_stat = seen
        path = self.options.mesh_file
        if seen is None:
            return self._once([f"the mesh file {path} is gone; destination serves its last state"])
        try:
            drafts = {d.key: d for d in self._read_mesh()[1]}
        except (OSError, DestinationError, PlanError) as e:  # DestinationError: any refusal
            return self._once(
                [
                    f"the mesh file changed and is refused ({e}); destination serves the last valid one"
                ]
            )
        added = sorted(drafts.keys() - self._drafts.keys())
        removed = sorted(self._drafts.keys() - drafts.keys())
        changed = sorted(
            k for k in drafts.keys() & self._drafts.keys() if drafts[k] != self._drafts[k]
        )
        parts = [
            f"{what} {', '.join(keys)}"
            for what, keys in (("added", added), ("removed", removed), ("changed", changed))
            if keys
        ]
        if not parts:
            return ["the mesh file changed; destination applies it (workloads unchanged)"]
        return self._once(
            [
                f"the mesh file changed: workloads {'; '.join(parts)}. Destination applies it "
                "now, but up starts and stops processes only when it starts: restart up for them"
            ]
        )

    def _once(self, problems: list[str]) -> list[str]:
        """The problems not reported yet (each is said once per run, not at every check)."""
        new = [m for m in problems if m not in self._said]
        self._said.update(new)
        return new

    def sync_trust_anchors(self) -> str | None:
        """Keep the anchors file that proxies start from in step with the store (checked on
        every call, cheaply: only a new store version is read). A message when rewritten."""
        try:
            version = self.home.store.current_version()
            if version is None or version == self._store_version:
                return None
            self._store_version = version  # tried once per version: a failure is said once
            if not sync_anchors(self.home):
                return None
        except (PKIError, OSError) as e:
            said = self._once([f"cannot update {self.home.anchors} from the store: {e}"])
            return said[0] if said else None
        return f"trust anchors file updated from store version {version} ({self.home.anchors})"

    def upstream(self, key: str, authority_prefix: str) -> tuple[str, int]:
        """The local address of workload ``key``'s upstream listener for a service whose
        authority starts with ``authority_prefix``."""
        for plan in self.plans:
            if plan.key == key:
                for host, port, authority in plan.upstreams:
                    if authority.startswith(authority_prefix):
                        return host, port
        raise KeyError(f"workload {key} has no upstream for {authority_prefix}")
