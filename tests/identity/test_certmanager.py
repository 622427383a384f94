"""cert-manager / trust-manager manifests: structure, and kubernetes-validate for built-ins."""

from __future__ import annotations

import pytest
import yaml

from identity.certmanager import CertManagerOptions, manifests, render
from pki.durations import parse_duration
from pki.errors import InvalidName


def test_rendered_resources() -> None:
    issuer, cert, bundle = yaml.safe_load_all(render(CertManagerOptions()))
    assert (issuer["kind"], issuer["spec"]) == (
        "ClusterIssuer",
        {"ca": {"secretName": "trustmesh-trust-anchor"}},
    )
    spec = cert["spec"]
    assert cert["metadata"] == {
        **cert["metadata"],
        "name": "trustmesh-identity-issuer",
        "namespace": "trustmesh",
    }
    assert spec["secretName"] == "trustmesh-identity-issuer"
    assert spec["isCA"] is True
    assert spec["privateKey"] == {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"}
    assert parse_duration(spec["duration"].replace("0m0s", "")).total_seconds() == 48 * 3600
    assert parse_duration(spec["renewBefore"].replace("0m0s", "")).total_seconds() == 25 * 3600
    assert spec["issuerRef"] == {"name": issuer["metadata"]["name"], "kind": "ClusterIssuer"}
    assert (
        spec["commonName"] == "identity.trustmesh.cluster.local" and "cert sign" in spec["usages"]
    )
    assert bundle["apiVersion"] == "trust.cert-manager.io/v1alpha1"
    assert bundle["metadata"]["name"] == "trustmesh-identity-trust-roots"
    assert bundle["spec"]["target"]["configMap"] == {"key": "ca-bundle.crt"}
    assert {"secret": {"name": "trustmesh-trust-anchor", "key": "tls.crt"}} in bundle["spec"][
        "sources"
    ]


def test_options_are_validated() -> None:
    with pytest.raises(InvalidName):
        CertManagerOptions(namespace="Not_Valid")
    cert = manifests(CertManagerOptions(namespace="mesh", trust_domain="example.org"))[1]
    assert cert["spec"]["commonName"] == "identity.mesh.example.org"


def test_built_in_kinds_validate_and_crds_are_structured() -> None:
    import kubernetes_validate

    docs = manifests(CertManagerOptions())
    # The cert-manager kinds are CRDs (kubernetes-validate has no schema for them); the
    # ConfigMap trust-manager writes and the Secret cert-manager writes are built-ins.
    configmap = {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": docs[2]["metadata"]["name"], "namespace": "trustmesh"},
                 "data": {docs[2]["spec"]["target"]["configMap"]["key"]: "PEM"}}  # fmt: skip
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
              "metadata": {"name": docs[1]["spec"]["secretName"], "namespace": "trustmesh"},
              "data": {"tls.crt": "", "tls.key": "", "ca.crt": ""}}  # fmt: skip
    for obj in (configmap, secret):
        kubernetes_validate.validate(obj, "1.30.0", strict=True)
    for doc in docs:
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
        with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
