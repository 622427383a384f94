"""What ``trustmesh proxy run`` is told, checked: :class:`SidecarConfig` and its parsers.

Light on imports (no TLS, HTTP or gRPC modules), so the CLI checks the flags and hands the
result over to the sidecar's own process (:mod:`trustmesh.up.sidecar_process`) without loading
what that process then loads.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pki.names import Identity, check_label, split_host_port
from proxy.policy import DefaultPolicy
from proxy.settings import DETECT_TIMEOUT, HEAD_TIMEOUT, SHUTDOWN_GRACE, KexPolicy, Listen

HOST = "127.0.0.1"  # where `up` binds, and the host of a listen address given as ":PORT"


def parse_listen(text: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); raises ValueError naming ``what``."""
    parts = split_host_port(text.strip(), lowest=0)
    if parts is None:
        raise ValueError(f"{what} {text!r} is not HOST:PORT with a port in 0..65535")
    return parts[0] or HOST, parts[1]


def parse_upstream(text: str) -> tuple[tuple[str, int], str]:
    """``LOCAL_ADDR=SERVICE_AUTHORITY`` -> ((host, port), authority)."""
    local, sep, authority = text.partition("=")
    if not sep or not authority.strip():
        raise ValueError(f"upstream {text!r} is not LOCAL_ADDR=SERVICE_AUTHORITY")
    return parse_listen(local, "upstream listen address"), authority.strip()


BUNDLE_SOURCES = ("destination", "file")
# Linkerd's ports; the inbound one faces other hosts, the others only this one.
OUTBOUND = Listen("127.0.0.1", 4140)
INBOUND = Listen("0.0.0.0", 4143)
ADMIN = Listen("127.0.0.1", 4191)


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """Everything ``trustmesh proxy run`` is told (flags or TRUSTMESH_PROXY_* variables)."""

    namespace: str
    workload: str
    service_account: str
    token_file: Path
    trust_anchors: Path
    identity_addr: str = "127.0.0.1:8080"
    identity_name: str | None = None  # TLS name of the identity service; None: plaintext
    destination_addr: str = "127.0.0.1:8086"
    destination_name: str | None = None
    outbound: Listen = OUTBOUND
    inbound: Listen = INBOUND
    admin: Listen = ADMIN
    upstreams: tuple[tuple[Listen, str], ...] = ()
    app_host: str = "127.0.0.1"
    app_ports: tuple[int, ...] = ()
    kex: KexPolicy = KexPolicy.HYBRID_REQUIRED
    default_inbound_policy: DefaultPolicy = DefaultPolicy.ALL_UNAUTHENTICATED
    bundle_from: str = "destination"
    trust_domain: str = "cluster.local"
    control_plane_namespace: str = "trustmesh"
    cluster_domain: str = "cluster.local"
    startup_wait: float = 5.0  # for policies and upstream endpoints, once certified
    detect_timeout: float = DETECT_TIMEOUT
    head_timeout: float = HEAD_TIMEOUT
    shutdown_grace: float = SHUTDOWN_GRACE

    def __post_init__(self) -> None:
        check_label("namespace", self.namespace)
        check_label("workload name", self.workload)
        if self.bundle_from not in BUNDLE_SOURCES:
            raise ValueError(f"trust bundle source must be one of {', '.join(BUNDLE_SOURCES)}")
        for port in self.app_ports:
            if not 0 < port < 65536:
                raise ValueError(f"application port {port} is outside 1..65535")
        if not isinstance(self.kex, KexPolicy):
            raise TypeError("kex must be a KexPolicy")

    def to_json(self) -> str:
        """This configuration as :meth:`from_json` reads it back (the hand-over to the
        sidecar's own process)."""
        return json.dumps({f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)})

    @classmethod
    def from_json(cls, text: str) -> SidecarConfig:
        """The configuration :meth:`to_json` wrote; ValueError naming what is wrong."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"sidecar configuration is not JSON: {e}") from None
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or set(raw) - names:
            extra = sorted(set(raw) - names) if isinstance(raw, dict) else ["(not an object)"]
            raise ValueError(f"sidecar configuration has unknown settings: {', '.join(extra)}")

        def listen(v: Any) -> Listen:
            host, port = v
            return Listen(host, port)

        readers: dict[str, Callable[[Any], Any]] = {
            "token_file": Path,
            "trust_anchors": Path,
            "outbound": listen,
            "inbound": listen,
            "admin": listen,
            "upstreams": lambda v: tuple((listen(local), authority) for local, authority in v),
            "app_ports": tuple,
            "kex": KexPolicy,
            "default_inbound_policy": DefaultPolicy,
        }
        try:
            return cls(**{k: readers.get(k, lambda v: v)(v) for k, v in raw.items()})
        except (TypeError, ValueError) as e:
            raise ValueError(f"sidecar configuration: {e}") from None

    @property
    def identity(self) -> str:
        return Identity(
            self.service_account,
            self.namespace,
            self.control_plane_namespace,
            self.trust_domain,
        ).dns_name


def _plain(value: Any) -> Any:
    """``value`` as JSON holds it: paths and enums as strings, listeners as [host, port]."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Listen):
        return [value.host, value.port]
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
