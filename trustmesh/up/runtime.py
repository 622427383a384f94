"""``trustmesh up``: the local PKI, the control plane with TLS, and the workloads of a mesh file
as supervised child processes.

Start order: the mesh file is read and planned, and every port the children will listen on is
checked free (so a bad file or a busy port is refused before anything is created), then the PKI
(first run only), identity and destination side by side (each until its admin
``/ready``), then every application and proxy side by side (applications until they accept,
proxies until ``/ready``, which a proxy reaches only with a certificate). Stop goes in the
supervisor's rounds: the proxies first, which drain (each connection closes after the request
in progress, opaque streams run to the shutdown grace) while their applications still answer,
then the applications, then the control plane; SIGKILL for what outlives its round's grace.
A workload removed from the mesh file is stopped the same way, proxy before application.

While it runs, ``up`` follows the mesh file (:meth:`Mesh.reconcile`): the processes of a
workload removed from it are stopped, those of a new workload started, and of a changed one
only the processes whose command line changed are restarted. A workload started that way that
fails before it is ready is stopped and reported; the rest of the mesh runs on.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from destination.errors import DestinationError, InvalidMeshFile
from destination.meshfile import has_resources, load_mesh_text
from destination.resources import ClusterState, Workload
from pki.certs import utcnow
from pki.errors import PKIError
from proxy.settings import SHUTDOWN_GRACE
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
    plan_workload,
    proxy_args,
)

CHILD_ENV = {"PYTHONUNBUFFERED": "1"}
# The supervisor's stop rounds (ChildSpec.stop_order): proxies drain while their applications
# still answer; the control plane goes last. A proxy has its shutdown grace and this margin to
# exit after SIGTERM before it is killed.
STOP_PROXIES, STOP_APPS, STOP_CONTROL_PLANE = 0, 1, 2
PROXY_EXIT_MARGIN = 2.0


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


def _same_process(a: ChildSpec, b: ChildSpec) -> bool:
    return a.argv == b.argv and dict(a.env) == dict(b.env) and a.ready == b.ready


def start_all(supervisor: Supervisor, specs: Sequence[ChildSpec], timeout: float) -> None:
    """Start ``specs`` at once and wait until each is ready (their ``ready`` checks), failing
    fast, with the child's log file named, when one exits or the deadline passes."""
    children = [supervisor.launch(spec) for spec in specs]
    waiting = {spec.name: spec for spec in specs}
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

    settle = 0.3  # seconds the mesh file must stay unchanged before up acts on a change

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
        # The mesh file's workloads as running (ports up chooses left 0), and its stat.
        self._drafts: dict[str, WorkloadPlan] = {}
        self._mesh_stat: tuple[int, int, int] | None = None
        self._seen_stat: tuple[tuple[int, int, int] | None, float] | None = None  # (stat, since)
        self._specs: dict[str, tuple[ChildSpec, ...]] = {}  # workload -> its children
        self._starting: dict[str, float] = {}  # workload started while up runs -> deadline
        self.generation = 0  # +1 whenever workloads were started or stopped while running

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
                    stop_order=STOP_CONTROL_PLANE,
                ),
                ChildSpec(
                    "destination",
                    trustmesh_argv(*destination),
                    ReadyCheck((HOST, dst_admin)),
                    CHILD_ENV,
                    stop_order=STOP_CONTROL_PLANE,
                ),
            ],
            o.ready_timeout,
        )
        progress(f"starting {len(self.plans)} workloads")
        self.start_workloads()

    def start_workloads(self) -> None:
        """Start every planned workload and wait until all are ready (the control plane is
        up). Raises SupervisorError naming the one that failed."""
        for plan in self.plans:
            self._specs[plan.key] = self._workload_specs(plan)
            if plan.admin_port is not None:
                self.admin[plan.key] = f"{HOST}:{plan.admin_port}"
        specs = [spec for specs in self._specs.values() for spec in specs]
        start_all(self.supervisor, specs, self.options.ready_timeout)

    def _workload_specs(self, plan: WorkloadPlan) -> tuple[ChildSpec, ...]:
        """The children that run ``plan``: its application (if ``up`` starts it), its proxy."""
        assert self.control is not None
        specs = []
        slug = f"{plan.namespace}-{plan.name}"
        if plan.command:
            ready = ReadyCheck((HOST, plan.app_ports[0]), None) if plan.app_ports else None
            specs.append(
                ChildSpec(f"app-{slug}", plan.command, ready, CHILD_ENV, stop_order=STOP_APPS)
            )
        if plan.meshed:
            args = proxy_args(
                plan,
                self.control,
                token_file=str(self.home.token(plan.namespace, plan.service_account)),
                anchors=str(self.home.anchors),
                kex=self.options.kex,
            )
            assert plan.admin_port is not None
            specs.append(
                ChildSpec(
                    f"proxy-{slug}",
                    trustmesh_argv(*args),
                    ReadyCheck((HOST, plan.admin_port)),
                    CHILD_ENV,
                    stop_order=STOP_PROXIES,
                    stop_timeout=SHUTDOWN_GRACE + PROXY_EXIT_MARGIN,
                )
            )
        return tuple(specs)

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

    def reconcile(self, now: float | None = None) -> list[str]:
        """Follow the mesh file while ``up`` runs (cheap when it did not change: one stat),
        and see the workloads started by an earlier change through to ready. Destination
        applies a valid change itself (endpoints, routes, policy); here the processes follow:
        a removed workload's are stopped, a new one's started, and of a changed one only the
        processes whose command line changed are restarted. Returns what to tell the user; a
        refusal is said once."""
        now = time.monotonic() if now is None else now
        said = self._check_starting(now)
        seen = self._stat_mesh_file()
        if seen == self._mesh_stat:
            return said
        # Act on a file that has stopped changing: an editor's write in progress is not
        # taken for a mesh without the workloads it has not written yet.
        if self._seen_stat is None or self._seen_stat[0] != seen:
            self._seen_stat = (seen, now)
        if now - self._seen_stat[1] < self.settle:
            return said
        self._mesh_stat = seen
        path = self.options.mesh_file
        if seen is None:
            return said + self._once(
                [f"the mesh file {path} is gone; destination serves its last state"]
            )
        try:
            state, planned = self._read_mesh()
        except (OSError, DestinationError, PlanError) as e:  # DestinationError: any refusal
            return said + self._once(
                [
                    f"the mesh file changed and is refused ({e}); destination serves the last valid one"
                ]
            )
        if self._drafts and not has_resources(state):
            return said + self._once(
                [
                    f"the mesh file {path} has no resources (a file being written, or truncated "
                    "by mistake, looks like this): up keeps its workloads running, and "
                    "destination serves the last state"
                ]
            )
        drafts = {d.key: d for d in planned}
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
            return [*said, "the mesh file changed; destination applies it (workloads unchanged)"]
        said.append(f"the mesh file changed: workloads {'; '.join(parts)}")
        wanted = [k for k in drafts if k in added or k in changed]  # in file order
        return said + self._apply(state, drafts, removed, wanted, now)

    def _apply(
        self,
        state: ClusterState,
        drafts: Mapping[str, WorkloadPlan],
        removed: Sequence[str],
        wanted: Sequence[str],
        now: float,
    ) -> list[str]:
        said: list[str] = []
        plans = {p.key: p for p in self.plans}
        workloads = {f"{w.meta.namespace}/{w.meta.name}": w for w in state.workloads}
        free = self._free_ports(named_ports(list(drafts.values())))
        stop: set[str] = set()
        children: dict[str, tuple[ChildSpec, ...]] = {}  # of each wanted workload
        start: dict[str, list[ChildSpec]] = {}  # the ones to (re)start
        new_plans: dict[str, WorkloadPlan] = {}
        for key in removed:
            stop.update(spec.name for spec in self._specs.get(key, ()))
        for key in wanted:
            plan = self._replan(workloads[key], drafts[key], plans.get(key), free)
            new_plans[key] = plan
            running = {spec.name: spec for spec in self._specs.get(key, ())}
            specs = children[key] = self._workload_specs(plan)
            names = {spec.name for spec in specs}
            stop.update(name for name in running if name not in names)
            start[key] = []
            for spec in specs:
                if spec.name not in running:
                    start[key].append(spec)
                elif not _same_process(running[spec.name], spec):
                    stop.add(spec.name)
                    start[key].append(spec)
        if stop:
            self.supervisor.remove(stop)
            said.append(f"stopped {', '.join(sorted(stop))}")
            self.generation += 1
        for key in removed:
            self._forget(key)
        for key, plan in new_plans.items():
            said += self._start_workload(plan, drafts[key], children[key], start[key], now)
        merged = {**plans, **new_plans}
        self.plans = tuple(merged[k] for k in drafts if k in self._specs)
        return said

    def _replan(
        self,
        workload: Workload,
        draft: WorkloadPlan,
        old: WorkloadPlan | None,
        free: Iterator[int],
    ) -> WorkloadPlan:
        """``workload`` planned with free ports, keeping the ports ``up`` chose for it before
        when the file still leaves them to ``up`` (its clients and ``check`` know them)."""
        plan = plan_workload(workload, free)
        previous = self._drafts.get(draft.key)
        if old is None or previous is None:
            return plan
        kept = {
            field: getattr(old, field)
            for field in ("admin_port", "outbound_port")
            if getattr(draft, field) == 0
            and getattr(previous, field) == 0
            and getattr(old, field) is not None
        }
        return dataclasses.replace(plan, **kept)

    def _start_workload(
        self,
        plan: WorkloadPlan,
        draft: WorkloadPlan,
        children: tuple[ChildSpec, ...],
        specs: Sequence[ChildSpec],
        now: float,
    ) -> list[str]:
        """Start ``specs``, those of ``plan``'s ``children`` not running as they should."""
        key = plan.key
        self._specs[key] = children
        if specs:
            restarting = {spec.name.split("-", 1)[0] for spec in specs}
            try:
                check_ports_free(
                    listen_ports([plan], apps="app" in restarting, proxies="proxy" in restarting)
                )
                if "proxy" in restarting:  # its token, signed now (a file left by an
                    # earlier run may have expired; refresh_tokens re-signs it from here on)
                    write_token(self.home, plan.namespace, plan.service_account, now=utcnow())
                for spec in specs:
                    # Not restarted by the supervisor until ready: a new workload that cannot
                    # start is reported and stopped, not left to crash-loop the whole mesh.
                    self.supervisor.launch(dataclasses.replace(spec, restart=False))
            except (SupervisorError, PKIError, OSError) as e:
                self._forget(key)
                return [f"cannot start workload {key}: {e}; the rest of the mesh runs on"]
            self.generation += 1
            self._starting[key] = now + self.options.ready_timeout
        self._drafts[key] = draft
        if plan.admin_port is not None:
            self.admin[key] = f"{HOST}:{plan.admin_port}"
        else:
            self.admin.pop(key, None)
        return [f"starting workload {key}"] if specs else []

    def _check_starting(self, now: float) -> list[str]:
        """Workloads started while running: ready (then supervised as any other), exited or
        out of time (then stopped, and said)."""
        said = []
        for key, deadline in list(self._starting.items()):
            children = [self.supervisor.child(spec.name) for spec in self._specs[key]]
            exited = next(
                (c for c in children if c is not None and c.proc.poll() is not None), None
            )
            if exited is not None:
                failure = self.supervisor.failure(exited, "while starting")
                self._forget(key)
                said.append(f"{failure}\nworkload {key} is stopped; the rest of the mesh runs on")
            elif all(c is None or c.spec.ready is None or c.spec.ready() for c in children):
                for child in children:
                    if child is not None:
                        child.spec = dataclasses.replace(child.spec, restart=True)
                del self._starting[key]
                said.append(f"workload {key} is ready")
            elif now > deadline:
                self._forget(key)
                said.append(
                    f"workload {key} was not ready within {self.options.ready_timeout:.0f}s and "
                    f"is stopped; see its logs in {self.supervisor.log_dir}"
                )
        return said

    def _forget(self, key: str) -> None:
        """Stop ``key``'s children (those still running) and drop it: a later change of the
        mesh file that names it again starts it afresh."""
        names = {spec.name for spec in self._specs.pop(key, ())}
        if names & {c.spec.name for c in self.supervisor.children}:
            self.supervisor.remove(names)
            self.generation += 1
        self._drafts.pop(key, None)
        self._starting.pop(key, None)
        self.admin.pop(key, None)
        self.plans = tuple(p for p in self.plans if p.key != key)

    @staticmethod
    def _free_ports(exclude: set[int]) -> Iterator[int]:
        """Free ports, none of them in ``exclude``, none twice."""
        seen = set(exclude)
        while True:
            for port in free_ports(8):
                if port not in seen:
                    seen.add(port)
                    yield port

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
