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
    """Starts, feeds and stops the worker processes; collects their counters."""

    def __init__(self, count: int, spec: WorkerSpec, reports: BundleReports) -> None:
        self._count = count
        self._spec = spec
        self._reports = reports
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        self._stats: dict[int, Mapping[str, object]] = {}
        self._lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self._ready = threading.Semaphore(0)

    def start(self, issuer: Any, timeout: float = 30.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        for i in range(self._count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main,
                args=(self._spec, child),
                name=f"identity-worker-{i}",
                daemon=True,
            )
            proc.start()
            child.close()
            if issuer is not None:
                parent.send(_issuer_message(issuer))
            self._procs.append(proc)
            self._conns.append(parent)
            reader = threading.Thread(target=self._read, args=(i, parent), daemon=True)
            reader.start()
            self._readers.append(reader)
        deadline = time.monotonic() + timeout
        for _ in range(self._count):
            if not self._ready.acquire(timeout=max(0.0, deadline - time.monotonic())):
                self.stop()
                raise RuntimeError("identity workers did not start in time")

    def _read(self, index: int, conn: multiprocessing.connection.Connection) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            if message[0] == "ready":
                self._ready.release()
            elif message[0] == "stats":
                with self._lock:
                    self._stats[index] = message[1]
                self._reports.merge(message[2])

    def publish(self, issuer: Any) -> None:
        message = _issuer_message(issuer)
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(message)

    def snapshots(self) -> list[Mapping[str, object]]:
        with self._lock:
            return list(self._stats.values())

    def stop(self, timeout: float = 5.0) -> None:
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
    if config.tls:
        await asyncio.to_thread(first_issuer.wait, 30.0)
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
