"""Lookup targets: service authorities, context tokens and workload references.

Authorities follow Linkerd: ``<svc>.<ns>.svc.<cluster-domain>[:<port>]`` (port 80 when absent),
or ``<instance>.<svc>.<ns>.svc.<cluster-domain>`` for one StatefulSet-style instance. IP lookups
and names outside the cluster domain are ``InvalidTarget`` (gRPC INVALID_ARGUMENT).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from destination.errors import InvalidTarget
from pki.errors import quoted
from pki.names import is_dns1123_label, port_number

DEFAULT_PORT = 80
# A DNS name is at most 253 characters; with ":65535" an authority is at most 259. Longer paths
# are refused before parsing, and error messages quote requests with pki.errors.quoted.
MAX_PATH = 259


@dataclass(frozen=True, slots=True)
class Target:
    """A service port to resolve, optionally narrowed to one named instance."""

    namespace: str
    service: str
    port: int
    cluster_domain: str = "cluster.local"
    instance: str | None = None

    @property
    def authority(self) -> str:
        host = f"{self.service}.{self.namespace}.svc.{self.cluster_domain}"
        if self.instance:
            host = f"{self.instance}.{host}"
        return f"{host}:{self.port}"


def parse_authority(path: str, cluster_domain: str = "cluster.local") -> Target:
    """Parse a ``GetDestination.path`` / outbound authority into a :class:`Target`."""
    if not isinstance(path, str) or not path:
        raise InvalidTarget(
            "the destination path is empty; expected <svc>.<ns>.svc.<domain>:<port>"
        )
    if len(path) > MAX_PATH:
        raise InvalidTarget(
            f"the destination path is {len(path)} characters; a service name and port take at "
            f"most {MAX_PATH}"
        )
    host, port = _split_port(path)
    host = host.rstrip(".")  # a fully-qualified name may end in '.'
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    else:
        raise InvalidTarget(f"{quoted(path)}: IP queries are not supported; ask for a service name")
    suffix = f".svc.{cluster_domain}"
    if not host.endswith(suffix):
        raise InvalidTarget(f"{quoted(path)} is not a service name ending in {suffix}")
    labels = host[: -len(suffix)].split(".")
    if len(labels) == 2:
        instance, (service, namespace) = None, labels
    elif len(labels) == 3:
        instance, service, namespace = labels
    else:
        raise InvalidTarget(f"{quoted(path)} is not of the form <svc>.<ns>{suffix}[:<port>]")
    for label in (service, namespace, instance):
        if label is not None and not is_dns1123_label(label):
            raise InvalidTarget(f"{quoted(path)}: {quoted(label)} is not a DNS-1123 label")
    return Target(namespace, service, port, cluster_domain, instance)


def _split_port(path: str) -> tuple[str, int]:
    host, sep, port_text = path.rpartition(":")
    if not sep or "]" in port_text:
        return path, DEFAULT_PORT
    port = port_number(port_text)
    if port is None:
        raise InvalidTarget(f"{quoted(path)}: port {quoted(port_text)} is not a number in 1..65535")
    return host, port


@dataclass(frozen=True, slots=True)
class WorkloadRef:
    """Who is asking: a workload (pod) name in a namespace; both may be unknown."""

    namespace: str | None = None
    name: str | None = None
    node: str | None = None

    def token(self) -> str:
        """The JSON context token a proxy sends (Linkerd's ``{"ns":…,"pod":…}`` form)."""
        data = {"ns": self.namespace, "pod": self.name, "nodeName": self.node}
        return json.dumps({k: v for k, v in data.items() if v}, separators=(",", ":"))


def parse_workload_ref(text: str) -> WorkloadRef:
    """Parse a context token or policy workload string.

    Accepts JSON ``{"ns": "<ns>", "pod": "<name>", "nodeName": "<node>"}`` (``workload`` is an
    alias of ``pod``), the legacy ``ns:<ns>`` and the policy form ``<ns>:<name>``; "" is anonymous.
    """
    if not text:
        return WorkloadRef()
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            raise InvalidTarget(f"context token {quoted(text)} is not valid JSON") from None
        if not isinstance(data, dict):
            raise InvalidTarget("context token JSON must be an object")
        ns = data.get("ns")
        name = data.get("pod", data.get("workload"))
        node = data.get("nodeName")
    else:
        first, sep, second = text.partition(":")
        if not sep:
            raise InvalidTarget(f"workload {quoted(text)} is neither JSON nor <ns>:<name>")
        ns, name, node = (second, None, None) if first == "ns" else (first, second, None)
    for field, value in (("ns", ns), ("pod", name)):
        if value is not None and (not isinstance(value, str) or not is_dns1123_label(value)):
            raise InvalidTarget(f"workload {field} {quoted(value)} is not a DNS-1123 label")
    if node is not None and not isinstance(node, str):
        raise InvalidTarget("context token nodeName must be a string")
    return WorkloadRef(ns or None, name or None, node or None)
