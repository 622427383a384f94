"""The identity server: gRPC ``Certify`` on grpc.aio, the issuer watcher and the admin port.

Plain gRPC by default (as Linkerd, where the pod's proxy adds TLS). With ``tls=True`` the server
presents a certificate it issues to itself from the current issuer, for
``trustmesh-identity.<ns>.serviceaccount.identity.<ns>.<trust-domain>``; clients verify it
against the trust bundle. The serving certificate is re-issued when the issuer changes or 70 %
of its life has passed, picked up by grpc's certificate fetcher at the next handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from identity.admin import AdminServer
from identity.bundlereports import BundleReports
from identity.errors import (
    RESULT_INTERNAL,
    InvalidRequest,
    IssuerNotReady,
    StartupError,
    status_of,
)
from identity.issuer import Issuer
from identity.metrics import IdentityCollector, IssuanceStats, ReloadStats, new_registry
from identity.service import Certifier, IssuancePolicy
from identity.sources import IssuerSource
from identity.validators import Domain, TokenValidator
from identity.watcher import EventRecorder, IssuerWatcher
from identity.workers import ValidatorSpec, WorkerPool, WorkerSpec
from pki.certs import Credential, issue_identity
from pki.keys import PrivateKey
from pki.names import Identity, control_plane_identity, split_host_port
from pki.renewal import refresh_delay
from protos import identity_pb2, identity_pb2_grpc
from protos.rpc import StatusCode

log = logging.getLogger(__name__)
# identity.errors maps to the protocol's codes; grpcio wants its own enum for them.
GRPC_CODES = {StatusCode(c.value[0]): c for c in grpc.StatusCode}

SERVING_CERT_LIFETIME = timedelta(hours=24)
MAX_PENDING_CALLS = 16_384  # calls received and not yet handled, per server process


def grpc_target(addr: str) -> str:
    """A grpc bind target for HOST:PORT (IPv6 hosts bracketed)."""
    host, port = split_hostport(addr)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_hostport(addr: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` / ``"[::1]:8080"`` → host and port; a clear error otherwise."""
    parts = split_host_port(addr, lowest=0)
    if parts is None or not parts[0]:
        raise ValueError(f"address {addr!r} is not HOST:PORT")
    return parts


def check_address_free(addr: str) -> None:
    """Raise :class:`StartupError` unless ``addr`` can be bound now.

    grpc sets ``SO_REUSEPORT`` on its listening sockets (the worker processes rely on it), so
    binding a port another server already holds would quietly share that server's connections
    instead of failing. A probe socket without ``SO_REUSEPORT`` cannot bind such a port.
    """
    host, port = split_hostport(addr)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartupError(f"cannot listen on {addr}: {e.strerror}") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            try:
                probe.bind(sockaddr)
            except OSError as e:
                raise StartupError(f"cannot listen on {addr}: {e.strerror}") from None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything the server needs besides its issuer source and token validator."""

    domain: Domain = field(default_factory=lambda: Domain("trustmesh", "cluster.local"))
    policy: IssuancePolicy = field(default_factory=IssuancePolicy)
    listen: str = "127.0.0.1:0"
    admin_listen: str | None = "127.0.0.1:0"
    tls: bool = False
    reload_interval: float = 1.0

    def __post_init__(self) -> None:
        split_hostport(self.listen)
        if self.admin_listen is not None:
            split_hostport(self.admin_listen)
        if self.reload_interval <= 0:
            raise ValueError("reload_interval must be positive")

    def grpc_options(self) -> list[tuple[str, int | str]]:
        return [
            # gRPC refuses bigger messages before they are parsed (RESOURCE_EXHAUSTED).
            ("grpc.max_receive_message_length", self.policy.max_request_bytes),
            # Worker processes bind the same port; the kernel spreads connections.
            ("grpc.so_reuseport", 1),
            # grpc cancels calls that wait for a handler beyond 1,000 (soft) / 3,000 (hard) per
            # server: a restart storm of 10,000 proxies made it fail a third of them CANCELLED.
            # Every accepted call must be answered, so the queue is raised; the message limit
            # above bounds what each waiting call holds.
            ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
            # Certify is many small unary calls at once in a storm; measured at 32 callers with
            # --workers 2 (interleaved, 4 rounds): median 1,966 -> 2,148 certs/s.
            ("grpc.optimization_target", "throughput"),
        ]

    @property
    def server_identity(self) -> Identity:
        """The identity the server presents with ``tls``; clients expect this name."""
        return control_plane_identity(
            "identity",
            control_plane_namespace=self.domain.control_plane_namespace,
            trust_domain=self.domain.trust_domain,
        )


def tune_gc() -> None:
    """Set the garbage collector up for a long-running server process; call once, after start.

    What startup imported and built (grpc, protobuf, the issuer) lives as long as the process:
    frozen, it is no longer walked by every full collection, and a larger young generation
    (10,000 allocations instead of 700) scans the per-call objects, which reference counting
    frees anyway, far less often. Measured under h2load at 32 callers, one process, two
    series of 4 interleaved rounds: p99 latency 34-50 ms -> 24-28 ms in both; server CPU per
    certificate ~13 % lower in the first series and unchanged in the second (noise).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


class RefusalLog:
    """Logs refused Certify calls, at most ``burst`` per ``period`` seconds; the rest are
    counted and summarised in the next line that gets through (a client retrying a bad request
    in a loop must not flood the log, nor hide that it happened)."""

    def __init__(
        self,
        burst: int = 20,
        period: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst <= 0 or period <= 0:
            raise ValueError("refusal log burst and period must be positive")
        self._burst, self._period, self._monotonic = burst, period, monotonic
        self._window_start = -period
        self._logged = 0
        self.suppressed = 0

    def refused(self, identity: str, peer: str, result: str, message: str) -> None:
        now = self._monotonic()
        if now - self._window_start >= self._period:
            self._window_start, self._logged = now, 0
        if self._logged >= self._burst:
            self.suppressed += 1
            return
        self._logged += 1
        more = f" ({self.suppressed} more refusals not logged)" if self.suppressed else ""
        self.suppressed = 0
        log.warning(
            "refused Certify for %r from %s: %s: %s%s", identity, peer, result, message, more
        )


IDENTITY_SERVICE = "io.linkerd.proxy.identity.Identity"


def parse_request(data: bytes) -> identity_pb2.CertifyRequest | None:
    """grpc's request deserializer; None for bytes that are not a CertifyRequest, which Certify
    then refuses like any other bad request (a raising deserializer makes grpc answer UNKNOWN
    and log a traceback for every such call, bypassing the refusal log and the counters)."""
    try:
        return identity_pb2.CertifyRequest.FromString(data)
    except DecodeError:
        return None


def add_identity_service(servicer: IdentityServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` (the generated registration, with :func:`parse_request`)."""
    handlers = {
        "Certify": grpc.unary_unary_rpc_method_handler(
            servicer.Certify,
            request_deserializer=parse_request,
            response_serializer=identity_pb2.CertifyResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(IDENTITY_SERVICE, handlers),)
    )
    server.add_registered_method_handlers(IDENTITY_SERVICE, handlers)


class IdentityServicer(identity_pb2_grpc.IdentityServicer):
    """Adapts :class:`Certifier` to gRPC: one status per refusal, metrics per call, and an
    audit line per certificate issued (identity, serial, NotAfter, issuer, peer). Tokens and
    CSRs are never logged."""

    def __init__(
        self,
        certifier: Certifier,
        stats: IssuanceStats,
        reports: BundleReports,
        refusals: RefusalLog | None = None,
    ) -> None:
        self._certifier = certifier
        self._stats = stats
        self._reports = reports
        self._refusals = refusals or RefusalLog()

    async def Certify(
        self, request: identity_pb2.CertifyRequest | None, context: grpc.aio.ServicerContext
    ) -> identity_pb2.CertifyResponse:
        start = time.perf_counter()
        try:
            if request is None:
                raise InvalidRequest(
                    "the request is not a CertifyRequest (malformed protobuf, or a string "
                    "field that is not UTF-8)"
                )
            issued = await self._certifier.certify(
                request.identity, request.token, request.certificate_signing_request
            )
        except Exception as e:
            code, message, result = status_of(e)
            name = request.identity[:253] if request is not None else ""
            if result == RESULT_INTERNAL:
                log.exception("Certify for %r failed", name)
            else:
                self._refusals.refused(name, context.peer(), result, message)
            self._stats.observe(result, time.perf_counter() - start)
            await context.abort(GRPC_CODES[code], message)
        assert request is not None  # refused above (abort raises)
        until = Timestamp()
        until.FromDatetime(issued.valid_until)
        self._stats.observe("ok", time.perf_counter() - start)
        self._reports.record(
            request.identity, request.trust_bundle_digest, issued.valid_until.timestamp()
        )
        log.info(
            "issued certificate for %s serial=%x until %s issuer=%s peer=%s",
            request.identity,
            issued.leaf.serial,
            issued.valid_until.isoformat(),
            issued.chain[0].fingerprint[:16],
            context.peer(),
        )
        return identity_pb2.CertifyResponse(
            leaf_certificate=issued.leaf.der,
            intermediate_certificates=issued.chain_der,
            valid_until=until,
        )


class ServingCertificate:
    """The server's own TLS certificate, kept in step with the issuer (thread-safe)."""

    def __init__(
        self, identity: Identity, certifier: Certifier, clock: Callable[[], datetime]
    ) -> None:
        self._identity = identity
        self._certifier = certifier
        self._clock = clock
        self._lock = threading.Lock()
        self._credential: Credential | None = None
        self._issuer_fp: str | None = None
        self._renew_at: datetime | None = None

    @property
    def credential(self) -> Credential | None:
        return self._credential

    def refresh(self) -> bool:
        """Re-issue if the issuer changed or the renewal point passed; True when re-issued."""
        issuer = self._certifier.issuer
        if issuer is None:
            raise IssuerNotReady("no issuer loaded: cannot issue the server's TLS certificate")
        now = self._clock()
        with self._lock:
            fresh = (
                self._issuer_fp == issuer.fingerprint
                and self._renew_at is not None
                and now < self._renew_at
            )
            if fresh:
                return False
            cred = issue_identity(
                self._identity, PrivateKey.generate(), issuer.credential, now=now,
                lifetime=SERVING_CERT_LIFETIME, anchor=self._certifier.anchor,
            )  # fmt: skip
            self._credential = cred
            self._issuer_fp = issuer.fingerprint
            self._renew_at = now + refresh_delay(cred.expires, now)
            return True

    def grpc_config(self) -> grpc.ServerCertificateConfiguration:
        cred = self._credential
        assert cred is not None
        return grpc.ssl_server_certificate_configuration([(cred.key.to_pem(), cred.chain_pem())])

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's per-handshake fetcher: a new configuration only when the cert changed."""
        try:
            return self.grpc_config() if self.refresh() else None
        except Exception:  # never fail a handshake path with a Python exception
            log.exception("could not refresh the identity server's TLS certificate")
            return None


class IdentityServer:
    """One identity server process: gRPC, admin port and issuer watcher on one event loop."""

    def __init__(
        self,
        config: ServerConfig,
        source: IssuerSource,
        validator: TokenValidator,
        *,
        clock: Callable[[], datetime],
        events: EventRecorder | None = None,
        workers: int = 1,
        worker_validator: ValidatorSpec | None = None,
    ) -> None:
        if workers > 1 and worker_validator is None:
            raise ValueError("worker processes need a ValidatorSpec to build their validator")
        self.config = config
        self._clock = clock
        self.certifier = Certifier(config.policy, validator, clock=clock)
        self.stats = IssuanceStats()
        self.reports = BundleReports()
        self.reloads = ReloadStats()
        self.watcher = IssuerWatcher(
            source,
            self._install,
            lambda: self.certifier.issuer,
            clock=clock,
            reloads=self.reloads,
            events=events,
            interval=config.reload_interval,
        )
        self.collector = IdentityCollector(
            issuer=lambda: self.certifier.issuer,
            ready=lambda: self.certifier.is_ready(self._clock()),
            clock=clock,
            issuance=self._issuance,
            reloads=self.reloads,
            reports=self.reports,
        )
        self.registry = new_registry(self.collector, self._worker_pids)
        self.serving = ServingCertificate(config.server_identity, self.certifier, clock)
        self._grpc: grpc.aio.Server | None = None
        self._admin: AdminServer | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._workers = workers
        self._worker_validator = worker_validator
        self._pool: WorkerPool | None = None
        self.port = 0
        self.admin_port = 0

    def _install(self, issuer: Issuer) -> None:
        self.certifier.set_issuer(issuer)
        if self._pool is not None:
            self._pool.publish(issuer)

    def _worker_pids(self) -> list[tuple[int, int]]:
        return self._pool.pids() if self._pool is not None else []

    def _issuance(self) -> IssuanceStats:
        if self._pool is None:
            return self.stats
        return IssuanceStats.merged([self.stats.snapshot(), *self._pool.snapshots()])

    @property
    def issuer(self) -> Issuer | None:
        return self.certifier.issuer

    def readiness(self) -> tuple[bool, str]:
        issuer = self.certifier.issuer
        if issuer is None:
            return False, "not ready: no valid issuer loaded"
        if not self.certifier.is_ready(self._clock()):
            return False, f"not ready: issuer {issuer.fingerprint[:16]} is outside its validity"
        return True, f"ready: issuer {issuer.fingerprint[:16]}"

    async def start(self) -> None:
        """Load the issuer, then listen; on any failure, stop what was started and raise."""
        await asyncio.to_thread(self.watcher.reload)
        try:
            await self._listen()
        except BaseException:
            await self.stop(0)
            raise

    async def _listen(self) -> None:
        host, _ = split_hostport(self.config.listen)
        check_address_free(self.config.listen)
        server = grpc.aio.server(options=self.config.grpc_options())
        add_identity_service(IdentityServicer(self.certifier, self.stats, self.reports), server)
        target = grpc_target(self.config.listen)
        try:
            if self.config.tls:
                self.serving.refresh()  # raises IssuerNotReady: TLS cannot start without an issuer
                creds = grpc.dynamic_ssl_server_credentials(
                    self.serving.grpc_config(), self.serving.fetch
                )
                self.port = server.add_secure_port(target, creds)
            else:
                self.port = server.add_insecure_port(target)
        except RuntimeError as e:  # grpc's "Failed to bind to address ..."
            raise StartupError(f"cannot listen on {self.config.listen}: {e}") from None
        await server.start()
        self._grpc = server
        if self._workers > 1:
            assert self._worker_validator is not None
            spec = WorkerSpec(
                dataclasses.replace(self.config, listen=f"{host}:{self.port}", admin_listen=None),
                self._worker_validator,
            )
            pool = WorkerPool(self._workers - 1, spec, self.reports)
            await asyncio.to_thread(pool.start, self.certifier.issuer)
            self._pool = pool
        if self.config.admin_listen is not None:
            self._admin = AdminServer(self.registry, self.readiness)
            try:
                self.admin_port = await self._admin.start(*split_hostport(self.config.admin_listen))
            except OSError as e:
                self._admin = None
                raise StartupError(
                    f"cannot listen on {self.config.admin_listen}: {e.strerror or e}"
                ) from None
        self._watch_task = asyncio.create_task(self.watcher.run())
        log.info("identity service listening on %s:%d (tls=%s)", host, self.port, self.config.tls)

    async def stop(self, grace: float = 1.0) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        if self._admin is not None:
            await self._admin.stop()
            self._admin = None
        if self._pool is not None:
            await asyncio.to_thread(self._pool.stop)
            self._pool = None
        if self._grpc is not None:
            await self._grpc.stop(grace)
            self._grpc = None

    async def wait(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_for_termination()
