"""Where certificates are found: a TrustMesh store, files on disk, live TLS endpoints, and the
workload certificates proxies report on their admin port.

Every source has a ``name`` (the ``source`` label of the exported series: ``store:DIR``,
``file:PATH``, ``probe:HOST:PORT``, ``proxy:HOST:PORT``) and a blocking ``read()`` that returns a
:class:`~alerts.inventory.Reading` or raises :class:`~alerts.errors.SourceError` with a sentence
saying what went wrong. Probes talk TLS through pyOpenSSL and never verify the peer: they report
what the endpoint presents, trusted or not, which is exactly what expiry alerting needs.
"""

from __future__ import annotations

import http.client
import ipaddress
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from OpenSSL import SSL

from alerts.errors import SourceError
from alerts.inventory import Reading, classify
from alerts.thresholds import ROLES
from pki.certs import Certificate, load_pem_chain
from pki.errors import PKIError
from pki.store import FileStore

CERT_SUFFIXES = (".pem", ".crt", ".cer", ".der")
DEFAULT_PROBE_TIMEOUT = 5.0


class Source(Protocol):
    @property
    def name(self) -> str: ...

    def read(self) -> Reading: ...


def split_role(spec: str) -> tuple[str | None, str]:
    """``"webhook=/etc/tls/tls.crt"`` -> ``("webhook", "/etc/tls/tls.crt")``; a spec without a
    known role prefix is returned whole with role None (classified per certificate)."""
    role, sep, rest = spec.partition("=")
    if sep and role in ROLES:
        if not rest:
            raise ValueError(f"{spec!r}: nothing after '{role}='")
        return role, rest
    return None, spec


@dataclass(frozen=True, slots=True)
class StoreSource:
    """The current version of a :class:`pki.store.FileStore`: its anchors and its issuer chain."""

    path: Path

    @property
    def name(self) -> str:
        return f"store:{self.path}"

    def read(self) -> Reading:
        try:
            state = FileStore(self.path).load()
        except (PKIError, OSError) as e:
            raise SourceError(f"cannot read the store at {self.path}: {e}") from None
        certs: list[tuple[Certificate, str]] = []
        if state.bundle is not None:
            certs.extend((anchor, "trust_anchor") for anchor in state.bundle.anchors)
        if state.issuer is not None:
            certs.append((state.issuer.certificate, "issuer"))
            certs.extend((c, classify(c)) for c in state.issuer.chain)
        digest = state.bundle.digest if state.bundle is not None else None
        return Reading(tuple(certs), digest)


def _load_file(path: Path) -> tuple[Certificate, ...]:
    """The certificates in ``path``; () for a PEM file without any (a private key, a CSR),
    whose blocks are then never decoded."""
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        if b"-----BEGIN CERTIFICATE-----" not in data:
            # Other certificate encodings ("TRUSTED CERTIFICATE", "X509 CERTIFICATE") are not
            # skipped in silence: a certificate nobody watches is what this module prevents.
            if b"CERTIFICATE-----" in data.replace(b"CERTIFICATE REQUEST-----", b""):
                raise SourceError("its certificates are not in 'BEGIN CERTIFICATE' PEM blocks")
            return ()
        return load_pem_chain(data)
    return (Certificate.load(data),)


@dataclass(frozen=True, slots=True)
class FileSource:
    """A certificate file (PEM, possibly several certificates, or DER) or a directory of them
    (``*.pem``, ``*.crt``, ``*.cer``, ``*.der``, not recursive). PEM files without a
    certificate (``key.pem`` beside ``crt.pem``, CSRs) are skipped undecoded. In a directory, a
    file that cannot be read fails the source but not the certificates of the other files."""

    path: Path
    role: str | None = None

    @property
    def name(self) -> str:
        return f"file:{self.path}"

    def _files(self) -> list[Path]:
        if self.path.is_dir():
            return sorted(p for p in self.path.iterdir() if p.suffix.lower() in CERT_SUFFIXES)
        if not self.path.exists():
            raise SourceError(f"{self.path} does not exist")
        return [self.path]

    def read(self) -> Reading:
        certs: list[tuple[Certificate, str]] = []
        errors: list[str] = []
        for file in self._files():
            try:
                loaded = _load_file(file)
            except (PKIError, OSError, SourceError) as e:
                errors.append(f"{file} holds no readable certificate: {e}")
                continue
            if not loaded and file == self.path:
                errors.append(f"{file} holds no certificate")
            certs.extend((c, self.role or classify(c)) for c in loaded)
        if errors and not certs:
            raise SourceError("; ".join(errors))
        return Reading(tuple(certs), errors=tuple(errors))


def parse_address(address: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> ``(host, port)``; raises ValueError naming the problem.
    Port 0 (any free port) is accepted only with ``allow_port_zero``, for listen addresses."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{address!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{address!r}: port {port!r} is not a number") from None
    if not (0 if allow_port_zero else 1) <= number < 65536:
        raise ValueError(f"{address!r}: port {number} is out of range")
    return host, number


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _wait(sock: socket.socket, want_write: bool, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    readable, writable, _ = select.select(
        [] if want_write else [sock], [sock] if want_write else [], [], remaining
    )
    if not readable and not writable:
        raise TimeoutError


@dataclass(frozen=True, slots=True)
class ProbeSource:
    """The certificates a TLS server presents on HOST:PORT (leaf first, then its chain)."""

    address: str
    role: str | None = None
    timeout: float = DEFAULT_PROBE_TIMEOUT

    def __post_init__(self) -> None:
        parse_address(self.address)
        if self.timeout <= 0:
            raise ValueError(f"probe timeout must be positive, got {self.timeout}")

    @property
    def name(self) -> str:
        return f"probe:{self.address}"

    def read(self) -> Reading:
        host, port = parse_address(self.address)
        deadline = time.monotonic() + self.timeout
        try:
            sock = socket.create_connection((host, port), timeout=self.timeout)
        except OSError as e:
            raise SourceError(f"cannot connect to {self.address}: {e.strerror or e}") from None
        try:
            chain = self._handshake(sock, host, deadline)
        finally:
            sock.close()
        if not chain:
            raise SourceError(f"{self.address} presented no certificate")
        certs = [(c, classify(c)) for c in chain]
        if self.role is not None:
            certs[0] = (chain[0], self.role)  # the role names the endpoint's own certificate
        return Reading(tuple(certs))

    def _handshake(self, sock: socket.socket, host: str, deadline: float) -> list[Certificate]:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_verify(SSL.VERIFY_NONE, None)
        sock.setblocking(False)
        conn = SSL.Connection(context, sock)
        if not _is_ip(host):
            conn.set_tlsext_host_name(host.encode("idna"))
        conn.set_connect_state()
        failure: str | None = None
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                wait_write = False
            except SSL.WantWriteError:
                wait_write = True
            except (SSL.Error, OSError) as e:
                # A server that insists on a client certificate may abort after sending its
                # own; what it sent is still worth reporting.
                failure = str(e) or type(e).__name__
                break
            try:
                _wait(sock, wait_write, deadline)
            except TimeoutError:
                raise SourceError(f"TLS handshake with {self.address} timed out") from None
        peer = conn.get_peer_cert_chain(as_cryptography=True) or []
        if not peer and failure is not None:
            raise SourceError(f"TLS handshake with {self.address} failed: {failure}")
        return [Certificate.from_x509(c) for c in peer]


@dataclass(frozen=True, slots=True)
class ProxySource:
    """The workload certificate (and chain) a TrustMesh proxy reports on its admin port's
    ``/certificate``: the certificate it presents on mesh connections, read without one."""

    address: str
    timeout: float = DEFAULT_PROBE_TIMEOUT
    max_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        parse_address(self.address)
        if self.timeout <= 0:
            raise ValueError(f"proxy timeout must be positive, got {self.timeout}")

    @property
    def name(self) -> str:
        return f"proxy:{self.address}"

    def read(self) -> Reading:
        host, port = parse_address(self.address)
        conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            conn.request("GET", "/certificate")
            response = conn.getresponse()
            body = response.read(self.max_bytes + 1)
        except (OSError, http.client.HTTPException) as e:
            raise SourceError(f"cannot read {self.address}/certificate: {e}") from None
        finally:
            conn.close()
        if response.status != 200:
            what = body[:200].decode("utf-8", "replace").strip()
            raise SourceError(
                f"proxy {self.address} answered {response.status} for /certificate: {what}"
            )
        if len(body) > self.max_bytes:
            raise SourceError(f"proxy {self.address} sent over {self.max_bytes} bytes")
        try:
            chain = load_pem_chain(body)
        except PKIError as e:
            raise SourceError(f"proxy {self.address} sent no valid certificate: {e}") from None
        return Reading(((chain[0], "workload"), *((c, classify(c)) for c in chain[1:])))


def sources_from(
    store: Path | None,
    scans: Sequence[str] = (),
    probes: Sequence[str] = (),
    *,
    proxies: Sequence[str] = (),
    probe_timeout: float = DEFAULT_PROBE_TIMEOUT,
) -> list[Source]:
    """Sources for the command-line arguments: ``--store DIR``, ``--scan [ROLE=]PATH``,
    ``--probe [ROLE=]HOST:PORT`` and ``--proxy ADMIN_HOST:PORT``. Raises ValueError for a
    malformed argument."""
    sources: list[Source] = []
    if store is not None:
        sources.append(StoreSource(Path(store)))
    for spec in scans:
        role, path = split_role(spec)
        sources.append(FileSource(Path(path), role))
    for spec in probes:
        role, address = split_role(spec)
        sources.append(ProbeSource(address, role, probe_timeout))
    for address in proxies:
        sources.append(ProxySource(address, probe_timeout))
    return sources
