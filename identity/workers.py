"""Extra gRPC worker processes sharing the server's port with ``SO_REUSEPORT``.

Issuance is CPU-bound Python plus grpc's own per-call cost, so one process uses one core. With
``--workers N`` the main process (issuer watcher, admin port, events, its own gRPC server) spawns
N-1 workers that each run a gRPC server on the same port; the kernel spreads connections across
them. The main process pushes every validated issuer down a pipe, so exactly one place watches,
validates and reports reloads; workers send their issuance counters back twice a second and the
admin port's ``/metrics`` shows the sum.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from identity.bundlereports import BundleReports

STATS_INTERVAL = 0.5
RESTART_BACKOFF = 1.0  # seconds before a dead worker is started again, doubling while it
MAX_RESTART_BACKOFF = 30.0  # keeps dying within a minute of its start
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ValidatorSpec:
    """How a worker builds its token validator (picklable)."""

    kind: str  # "local" | "kubernetes"
    audience: str
    local_key_pem: bytes | None = None
    kubeconfig: Path | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("local", "kubernetes"):
            raise ValueError(f"unknown token validator {self.kind!r}")
        if self.kind == "local" and not self.local_key_pem:
            raise ValueError("the local validator needs the token key")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    config: Any  # identity.server.ServerConfig (admin disabled, fixed port)
    validator: ValidatorSpec


def _issuer_message(issuer: Any) -> tuple[str, bytes, bytes, bytes, str]:
    cred = issuer.credential
    return ("issuer", cred.chain_pem(), cred.key.to_pem(), issuer.bundle.pem(), issuer.source)


def build_validator(
    spec: ValidatorSpec, domain: Any, clock: Callable[[], Any], leeway: timedelta
) -> Any:
    from identity.validators import KubernetesTokenValidator, LocalTokenValidator
    from pki.keys import PrivateKey

    if spec.kind == "local":
        assert spec.local_key_pem is not None
        key = PrivateKey.load(spec.local_key_pem)
        return LocalTokenValidator(key, domain, clock=clock, audience=spec.audience, leeway=leeway)
    from identity.runner import kubernetes_api_client

    return KubernetesTokenValidator(
        kubernetes_api_client(spec.kubeconfig), domain, audience=spec.audience
    )


class WorkerPool:
    """Starts, feeds and stops the worker processes; collects their counters.

    A worker that dies (killed, out of memory, a crash) is logged with its exit code and
    started again, after 1 s doubling to 30 s while it keeps dying within a minute of its start;
    until then the kernel sends its connections to the processes that remain. Its counters are
    kept, so the service's totals never go back.
    """

    def __init__(self, count: int, spec: WorkerSpec, reports: BundleReports) -> None:
        self._count = count
        self._spec = spec
        self._reports = reports
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        self._stats: dict[int, Mapping[str, object]] = {}
        self._retired: list[Mapping[str, object]] = []  # last counters of workers that died
        self._lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self._ready = threading.Semaphore(0)
        self._issuer: Any = None
        self._stopping = False
        self.restarts = 0

    def pids(self) -> list[tuple[int, int]]:
        """(worker number from 1, pid) of each live worker."""
        with self._lock:
            procs = list(self._procs)
        return [(i + 1, p.pid) for i, p in enumerate(procs) if p.pid is not None and p.is_alive()]

    def start(self, issuer: Any, timeout: float = 30.0) -> None:
        self._issuer = issuer
        for i in range(self._count):
            proc, parent = self._spawn(i)
            self._procs.append(proc)
            self._conns.append(parent)
            reader = threading.Thread(target=self._read, args=(i,), daemon=True)
            reader.start()
            self._readers.append(reader)
        deadline = time.monotonic() + timeout
        for _ in range(self._count):
            if not self._ready.acquire(timeout=max(0.0, deadline - time.monotonic())):
                self.stop()
                raise RuntimeError("identity workers did not start in time")

    def _spawn(
        self, index: int
    ) -> tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=worker_main,
            args=(self._spec, child),
            name=f"identity-worker-{index}",
            daemon=True,
        )
        proc.start()
        child.close()
        if self._issuer is not None:
            parent.send(_issuer_message(self._issuer))
        return proc, parent

    def _read(self, index: int) -> None:
        backoff = RESTART_BACKOFF
        while True:
            conn = self._conns[index]
            started = time.monotonic()
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    break
                if message[0] == "ready":
                    self._ready.release()
                elif message[0] == "stats":
                    with self._lock:
                        self._stats[index] = message[1]
                    self._reports.merge(message[2])
            if self._stopping:
                return
            proc = self._procs[index]
            proc.join(1.0)
            backoff = RESTART_BACKOFF if time.monotonic() - started > 60 else backoff
            log.error(
                "identity worker %d (pid %s) exited with code %s; starting it again in %.0f s",
                index, proc.pid, proc.exitcode, backoff,
            )  # fmt: skip
            with self._lock:
                last = self._stats.pop(index, None)
                if last is not None:
                    self._retired.append(last)
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_RESTART_BACKOFF)
            if self._stopping:
                return
            with contextlib.suppress(OSError):
                conn.close()
            sent = self._issuer
            self._procs[index], self._conns[index] = self._spawn(index)
            if self._issuer is not sent:  # published while the worker was being started
                with contextlib.suppress(OSError):
                    self._conns[index].send(_issuer_message(self._issuer))
            self.restarts += 1

    def publish(self, issuer: Any) -> None:
        self._issuer = issuer
        message = _issuer_message(issuer)
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(message)

    def snapshots(self) -> list[Mapping[str, object]]:
        with self._lock:
            return [*self._retired, *self._stats.values()]

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(1.0)
        for conn in self._conns:
            conn.close()
        self._procs.clear()
        self._conns.clear()


def worker_main(spec: WorkerSpec, conn: multiprocessing.connection.Connection) -> None:
    """Entry point of a worker process."""
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_worker(spec, conn))


async def _worker(spec: WorkerSpec, conn: multiprocessing.connection.Connection) -> None:
    import grpc

    from identity.issuer import Issuer, bundle_from_pem, credential_from_pems
    from identity.metrics import IssuanceStats
    from identity.server import (
        IdentityServicer,
        ServingCertificate,
        add_identity_service,
        grpc_target,
        tune_gc,
    )
    from identity.service import Certifier
    from pki.certs import utcnow

    config = spec.config
    loop = asyncio.get_running_loop()
    certifier = Certifier(
        config.policy,
        build_validator(spec.validator, config.domain, utcnow, config.policy.clock_skew),
        clock=utcnow,
    )
    stats = IssuanceStats()
    reports = BundleReports()
    stop = asyncio.Event()
    first_issuer = threading.Event()

    def receive() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                loop.call_soon_threadsafe(stop.set)
                return
            if message[0] == "issuer":
                _, chain, key, bundle, source = message
                cred = credential_from_pems(chain, key, source=source)
                certifier.set_issuer(Issuer(cred, bundle_from_pem(bundle, source=source), source))
                first_issuer.set()
            elif message[0] == "stop":
                loop.call_soon_threadsafe(stop.set)
                return

    threading.Thread(target=receive, daemon=True).start()
    server = grpc.aio.server(options=config.grpc_options())
    add_identity_service(IdentityServicer(certifier, stats, reports), server)
    # The port is shared (SO_REUSEPORT): once bound, the kernel hands this process its share
    # of new connections, so it binds only with an issuer to sign with. A worker started again
    # after a crash answered "cert issuer not ready yet" to its share until the issuer came.
    await asyncio.to_thread(first_issuer.wait, 30.0)
    if config.tls:
        serving = ServingCertificate(config.server_identity, certifier, utcnow)
        serving.refresh()
        creds = grpc.dynamic_ssl_server_credentials(serving.grpc_config(), serving.fetch)
        server.add_secure_port(grpc_target(config.listen), creds)
    else:
        server.add_insecure_port(grpc_target(config.listen))
    await server.start()
    tune_gc()
    conn.send(("ready",))
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STATS_INTERVAL)
            with contextlib.suppress(OSError):
                conn.send(("stats", stats.snapshot(), reports.drain()))
    finally:
        await server.stop(1.0)
