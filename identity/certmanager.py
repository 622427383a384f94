"""cert-manager and trust-manager resources that keep the identity issuer and trust roots fresh.

The integration contract is Linkerd's: whoever keeps the ``kubernetes.io/tls`` issuer Secret and
the trust-roots ConfigMap correct works with the identity service. Rendered here:

- a CA ``ClusterIssuer`` backed by the trust-anchor Secret, which lives in the trust namespace
  (``cert-manager``) so that trust-manager can read it too (the anchor stays a human decision);
- the issuer ``Certificate``: isCA, ECDSA P-256, 48h, renewed 25h before expiry, a new key on
  every renewal (``rotationPolicy: Always``; cert-manager ≤ 1.17 defaults to ``Never``);
- a trust-manager ``Bundle`` that writes ``ca-bundle.crt`` into the trust-roots ConfigMap of
  namespaces labelled as control plane, from the current and the previous anchor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from identity.sources import ISSUER_SECRET, TRUST_ROOTS_CONFIGMAP, TRUST_ROOTS_KEY
from pki.names import check_label, check_trust_domain

ANCHOR_SECRET = "trustmesh-trust-anchor"
PREVIOUS_ANCHOR_SECRET = "trustmesh-previous-anchor"
ANCHOR_ISSUER = "trustmesh-trust-anchor"
CONTROL_PLANE_LABEL = "trustmesh.io/is-control-plane"


@dataclass(frozen=True, slots=True)
class CertManagerOptions:
    namespace: str = "trustmesh"
    trust_domain: str = "cluster.local"
    trust_namespace: str = "cert-manager"  # trust-manager's trust namespace (app.trust.namespace)
    duration: str = "48h0m0s"
    renew_before: str = "25h0m0s"

    def __post_init__(self) -> None:
        check_label("namespace", self.namespace)
        check_label("trust namespace", self.trust_namespace)
        check_trust_domain(self.trust_domain)

    @property
    def issuer_common_name(self) -> str:
        return f"identity.{self.namespace}.{self.trust_domain}"


def manifests(opts: CertManagerOptions) -> list[dict[str, Any]]:
    """The three resources, as dicts in apply order."""
    ns = opts.namespace
    labels = {"app.kubernetes.io/part-of": "trustmesh", "app.kubernetes.io/component": "identity"}
    issuer = {
        "apiVersion": "cert-manager.io/v1",
        "kind": "ClusterIssuer",
        "metadata": {"name": ANCHOR_ISSUER, "labels": labels},
        "spec": {"ca": {"secretName": ANCHOR_SECRET}},
    }
    certificate = {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": {"name": ISSUER_SECRET, "namespace": ns, "labels": labels},
        "spec": {
            "secretName": ISSUER_SECRET,
            "duration": opts.duration,
            "renewBefore": opts.renew_before,
            "issuerRef": {"name": ANCHOR_ISSUER, "kind": "ClusterIssuer"},
            "commonName": opts.issuer_common_name,
            "dnsNames": [opts.issuer_common_name],
            "isCA": True,
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "usages": ["cert sign", "crl sign", "server auth", "client auth"],
        },
    }
    bundle = {
        "apiVersion": "trust.cert-manager.io/v1alpha1",
        "kind": "Bundle",
        "metadata": {"name": TRUST_ROOTS_CONFIGMAP, "labels": labels},
        "spec": {
            "sources": [
                {"secret": {"name": ANCHOR_SECRET, "key": "tls.crt"}},
                {"secret": {"name": PREVIOUS_ANCHOR_SECRET, "key": "tls.crt"}},
            ],
            "target": {
                "configMap": {"key": TRUST_ROOTS_KEY},
                "namespaceSelector": {"matchLabels": {CONTROL_PLANE_LABEL: "true"}},
            },
        },
    }
    return [issuer, certificate, bundle]


def render(opts: CertManagerOptions) -> str:
    """Multi-document YAML."""
    return yaml.safe_dump_all(manifests(opts), sort_keys=False, explicit_start=True)
