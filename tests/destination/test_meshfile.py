"""Mesh-file parsing: the issue's example, and refusals that name the document and field."""

from __future__ import annotations

import pytest
from destination_testlib import WEB

from destination.errors import InvalidMeshFile, InvalidResource
from destination.meshfile import load_mesh_text


def test_example_parses() -> None:
    st = load_mesh_text(WEB)
    assert st.workload("default", "web-0").inbound_proxy_port == 14143
    (slc,) = st.slices_of("default", "web")
    assert slc.endpoints[0].workload == "web-0" and slc.ports[0].port == 18080


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind: Service\n", "document 1 (Service default/?): apiVersion: is required"),
        (
            "apiVersion: v9\nkind: Gadget\nmetadata: {name: g}\n",
            "document 1 (Gadget default/g): kind: v9 Gadget is not a kind",
        ),
        (
            WEB.replace("address: 127.0.0.1", "address: not-an-ip"),
            "document 1 (Workload default/web-0): spec.address",
        ),
        (
            WEB.replace("serviceAccount: web", "serviceAccount: Web_1"),
            "spec.serviceAccount: service account 'Web_1'",
        ),
        (
            WEB + "---\n" + WEB.split("---\n")[1],
            "document 3 (Service default/web): metadata.name: duplicates document 2",
        ),
        (
            "apiVersion: policy.trustmesh.io/v1alpha1\nkind: Server\nmetadata: {name: s}\n"
            "spec: {podSelector: {}, port: 80, proxyProtocol: HTTP/3}",
            "spec.proxyProtocol: protocol 'HTTP/3' is not one of",
        ),
        (
            "apiVersion: trustmesh.io/v1alpha1\nkind: MeshConfig\nspec: {defaultInboundPolicy: allow-all}",
            "spec.defaultInboundPolicy: default inbound policy 'allow-all'",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n"
            "spec: {parentRefs: [{kind: Service, name: web}], rules: [{timeouts: {request: soon}}]}",
            "spec.rules[0].timeouts.request: invalid duration 'soon'",
        ),
    ],
)
def test_invalid_documents_name_document_and_field(text: str, expected: str) -> None:
    with pytest.raises(InvalidResource) as e:
        load_mesh_text(text, "mesh.yaml")
    assert expected in str(e.value)


def test_yaml_syntax_error_names_line() -> None:
    with pytest.raises(InvalidMeshFile, match="not valid YAML at line 3"):
        load_mesh_text("a: 1\nb: [unclosed\n", "mesh.yaml")


def test_two_workloads_on_one_address_port_are_refused() -> None:
    twin = WEB.split("---\n")[0].replace("web-0", "web-1")
    with pytest.raises(
        InvalidResource, match=r"workloads web-0 and web-1 both serve 127\.0\.0\.1:18080"
    ):
        load_mesh_text(WEB + "---\n" + twin)
