"""Workload identity names: Linkerd's DNS-like scheme and SPIFFE IDs.

A workload identity is ``<sa>.<ns>.serviceaccount.identity.<control-plane-ns>.<trust-domain>``
(Linkerd's format, so TrustMesh certificates are accepted by Linkerd proxies and vice versa);
the same identity as a SPIFFE ID is ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pki.errors import InvalidName

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_CONTROL_PLANE_NAMESPACE = "trustmesh"
_KIND = "serviceaccount"

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def is_dns1123_label(value: str) -> bool:
    """True when ``value`` is a DNS-1123 label (lower-case alphanumerics and '-', ≤ 63 chars)."""
    return isinstance(value, str) and _LABEL.fullmatch(value) is not None


def is_dns1123_subdomain(value: str) -> bool:
    """True when ``value`` is a DNS-1123 subdomain (dot-separated labels, ≤ 253 chars)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= 253
        and all(is_dns1123_label(part) for part in value.split("."))
    )


def port_number(text: str, *, lowest: int = 1) -> int | None:
    """``text`` as a TCP port in ``lowest``..65535, or None. Only ASCII digits, at most five:
    ``str.isdigit`` also takes ``²``, which ``int`` refuses, and ``int`` refuses strings of
    more than 4,300 digits (a ValueError where a clear refusal belongs)."""
    if not (text.isascii() and text.isdigit() and len(text) <= 5):
        return None
    number = int(text)
    return number if lowest <= number <= 65535 else None


def split_host_port(text: str, *, lowest: int = 1) -> tuple[str, int] | None:
    """``HOST:PORT`` or ``[V6]:PORT`` as (host, port), or None when ``text`` is not of that shape
    or the port is outside ``lowest``..65535. The host is ``""`` when omitted (``":PORT"``); what
    that means is the caller's to say."""
    host, sep, port_text = text.rpartition(":")
    port = port_number(port_text, lowest=lowest)
    if not sep or port is None:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def check_label(field: str, value: str) -> str:
    """Return ``value`` if it is a DNS-1123 label, else raise :class:`InvalidName` naming ``field``."""
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a string, not {type(value).__name__}")
    if not is_dns1123_label(value):
        raise InvalidName(
            f"{field} {value!r} is not a DNS-1123 label "
            "(lower-case letters, digits and '-', starting and ending alphanumeric, at most 63)"
        )
    return value


def check_trust_domain(value: str) -> str:
    """Return ``value`` if it is a valid trust domain (DNS-1123 subdomain), else raise."""
    if not isinstance(value, str):
        raise TypeError(f"trust domain must be a string, not {type(value).__name__}")
    if not is_dns1123_subdomain(value):
        raise InvalidName(
            f"trust domain {value!r} is not a DNS-1123 subdomain such as cluster.local"
        )
    return value


@dataclass(frozen=True, slots=True)
class Identity:
    """A workload identity: a service account in a namespace, within a trust domain."""

    service_account: str
    namespace: str
    control_plane_namespace: str = DEFAULT_CONTROL_PLANE_NAMESPACE
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    def __post_init__(self) -> None:
        check_label("service account", self.service_account)
        check_label("namespace", self.namespace)
        check_label("control-plane namespace", self.control_plane_namespace)
        check_trust_domain(self.trust_domain)
        if len(self.dns_name) > 253:
            raise InvalidName(f"identity {self.dns_name!r} is longer than 253 characters")

    @property
    def dns_name(self) -> str:
        """The Linkerd-style DNS-like name carried as the certificate's DNS SAN."""
        return (
            f"{self.service_account}.{self.namespace}.{_KIND}.identity."
            f"{self.control_plane_namespace}.{self.trust_domain}"
        )

    @property
    def spiffe_id(self) -> str:
        """The SPIFFE ID of this identity (``spiffe://<td>/ns/<ns>/sa/<sa>``)."""
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.dns_name

    @classmethod
    def parse(
        cls,
        name: str,
        *,
        control_plane_namespace: str | None = None,
        trust_domain: str | None = None,
    ) -> Identity:
        """Parse a DNS-like identity; when given, the control-plane ns and trust domain must match."""
        if not isinstance(name, str):
            raise TypeError(f"identity must be a string, not {type(name).__name__}")
        parts = name.split(".")
        if len(parts) < 6 or parts[2] != _KIND or parts[3] != "identity":
            raise InvalidName(
                f"identity {name!r} is not of the form "
                "<sa>.<ns>.serviceaccount.identity.<control-plane-ns>.<trust-domain>"
            )
        ident = cls(parts[0], parts[1], parts[4], ".".join(parts[5:]))
        if control_plane_namespace is not None and ident.control_plane_namespace != (
            control_plane_namespace
        ):
            raise InvalidName(
                f"identity {name!r} belongs to control-plane namespace "
                f"{ident.control_plane_namespace!r}, not {control_plane_namespace!r}"
            )
        if trust_domain is not None and ident.trust_domain != trust_domain:
            raise InvalidName(
                f"identity {name!r} belongs to trust domain {ident.trust_domain!r}, "
                f"not {trust_domain!r}"
            )
        return ident

    @classmethod
    def from_spiffe_id(
        cls, uri: str, *, control_plane_namespace: str = DEFAULT_CONTROL_PLANE_NAMESPACE
    ) -> Identity:
        """Parse ``spiffe://<td>/ns/<ns>/sa/<sa>``."""
        if not isinstance(uri, str):
            raise TypeError(f"SPIFFE ID must be a string, not {type(uri).__name__}")
        m = re.fullmatch(r"spiffe://([^/]+)/ns/([^/]+)/sa/([^/]+)", uri)
        if m is None:
            raise InvalidName(f"SPIFFE ID {uri!r} is not of the form spiffe://<td>/ns/<ns>/sa/<sa>")
        return cls(m.group(3), m.group(2), control_plane_namespace, m.group(1))


def control_plane_identity(
    component: str,
    *,
    control_plane_namespace: str = DEFAULT_CONTROL_PLANE_NAMESPACE,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
) -> Identity:
    """The identity of a control-plane component, e.g. ``trustmesh-identity.trustmesh.…``."""
    return Identity(
        f"trustmesh-{component}", control_plane_namespace, control_plane_namespace, trust_domain
    )


def namespace_wildcard(namespace: str, control_plane_namespace: str, trust_domain: str) -> str:
    """The wildcard matching every service account of ``namespace`` (policy "namespace identity")."""
    check_label("namespace", namespace)
    return f"*.{namespace}.{_KIND}.identity.{control_plane_namespace}.{trust_domain}"


def identity_matches(pattern: str, identity: str) -> bool:
    """Match an identity against an exact name, ``*`` (any), or a ``*.suffix`` wildcard
    (Linkerd's: one or more whole labels before ``.suffix``, so ``*.cluster.local`` is the
    whole trust domain; never ``suffix`` itself)."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        dotted = pattern[1:]
        return len(identity) > len(dotted) and identity.endswith(dotted) and identity[0] != "."
    return pattern == identity
