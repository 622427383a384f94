"""Identity names: Linkerd's DNS-like scheme and SPIFFE IDs, with hypothesis round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pki.errors import InvalidName
from pki.names import (
    Identity,
    check_label,
    control_plane_identity,
    identity_matches,
    is_dns1123_label,
    is_dns1123_subdomain,
    namespace_wildcard,
    port_number,
    split_host_port,
)

labels = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=3).map(".".join)
identities = st.builds(Identity, labels, labels, labels, domains)


@given(identities)
def test_dns_name_round_trip(ident: Identity) -> None:
    assert Identity.parse(ident.dns_name) == ident
    assert str(ident) == ident.dns_name


@given(identities)
def test_spiffe_round_trip(ident: Identity) -> None:
    parsed = Identity.from_spiffe_id(
        ident.spiffe_id, control_plane_namespace=ident.control_plane_namespace
    )
    assert parsed == ident


@given(st.text(max_size=80))
def test_parse_never_raises_anything_but_invalid_name(text: str) -> None:
    try:
        ident = Identity.parse(text)
    except InvalidName:
        return
    assert ident.dns_name == text


@given(st.text(max_size=80))
def test_spiffe_parse_never_raises_anything_but_invalid_name(text: str) -> None:
    try:
        Identity.from_spiffe_id(text)
    except InvalidName:
        pass


def test_linkerd_format() -> None:
    ident = Identity("web", "default")
    assert ident.dns_name == "web.default.serviceaccount.identity.trustmesh.cluster.local"
    assert ident.spiffe_id == "spiffe://cluster.local/ns/default/sa/web"
    assert (
        control_plane_identity("identity").dns_name
        == "trustmesh-identity.trustmesh.serviceaccount.identity.trustmesh.cluster.local"
    )


@pytest.mark.parametrize(
    "name",
    [
        "web.default.identity.trustmesh.cluster.local",  # missing serviceaccount
        "web.default.serviceaccount.ident.trustmesh.cluster.local",
        "Web.default.serviceaccount.identity.trustmesh.cluster.local",  # upper case
        "-web.default.serviceaccount.identity.trustmesh.cluster.local",
        "web.default.serviceaccount.identity.trustmesh.",
        "web..serviceaccount.identity.trustmesh.cluster.local",
        "a" * 64 + ".default.serviceaccount.identity.trustmesh.cluster.local",
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName):
        Identity.parse(name)


def test_parse_checks_control_plane_and_trust_domain() -> None:
    name = "web.default.serviceaccount.identity.linkerd.example.org"
    assert Identity.parse(name, trust_domain="example.org").control_plane_namespace == "linkerd"
    with pytest.raises(InvalidName, match="trust domain"):
        Identity.parse(name, trust_domain="cluster.local")
    with pytest.raises(InvalidName, match="control-plane namespace"):
        Identity.parse(name, control_plane_namespace="trustmesh")


@pytest.mark.parametrize(
    "uri",
    ["spiffe://cluster.local/ns/default", "http://cluster.local/ns/a/sa/b", "spiffe://x/ns/A/sa/b"],
)
def test_invalid_spiffe_ids(uri: str) -> None:
    with pytest.raises(InvalidName):
        Identity.from_spiffe_id(uri)


def test_types_are_checked() -> None:
    with pytest.raises(TypeError):
        Identity.parse(b"web")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        check_label("namespace", 3)  # type: ignore[arg-type]


def test_dns1123_helpers() -> None:
    assert is_dns1123_label("a-1") and not is_dns1123_label("a_1") and not is_dns1123_label("")
    assert is_dns1123_subdomain("cluster.local") and not is_dns1123_subdomain("a..b")
    assert not is_dns1123_subdomain("a." * 127 + "a")


def test_identity_matching() -> None:
    web = "web.default.serviceaccount.identity.trustmesh.cluster.local"
    wildcard = namespace_wildcard("default", "trustmesh", "cluster.local")
    assert identity_matches(wildcard, web)
    assert not identity_matches(wildcard, web.replace("default", "prod"))
    assert identity_matches("*", web) and identity_matches(web, web)
    assert not identity_matches(web, "api" + web[3:])


@pytest.mark.parametrize(
    ("text", "lowest", "expected"),
    [("80", 1, 80), ("65535", 1, 65535), ("0", 0, 0), ("00080", 1, 80), ("0", 1, None),
     ("65536", 1, None), ("", 1, None), ("-1", 0, None), (" 80", 1, None), ("8_0", 1, None),
     ("\u00b2", 1, None), ("\u0663", 1, None), ("0" * 40 + "80", 1, None), ("9" * 5000, 1, None)],
)  # fmt: skip
def test_port_number_takes_ascii_digits_in_range_only(
    text: str, lowest: int, expected: int | None
) -> None:
    assert port_number(text, lowest=lowest) == expected


@pytest.mark.parametrize(
    ("text", "lowest", "expected"),
    [("127.0.0.1:8080", 1, ("127.0.0.1", 8080)), ("[::1]:8080", 1, ("::1", 8080)),
     ("identity.trustmesh:443", 1, ("identity.trustmesh", 443)), (":0", 0, ("", 0)),
     (":0", 1, None), ("host", 1, None), ("host:", 1, None), ("host:http", 1, None),
     ("host:65536", 1, None), ("[::1]", 1, None), ("[::1:80", 1, ("[::1", 80)),
     ("a:b:8086", 1, ("a:b", 8086)), ("host:\u00b2", 1, None)],
)  # fmt: skip
def test_split_host_port_leaves_the_meaning_of_a_missing_host_to_the_caller(
    text: str, lowest: int, expected: tuple[str, int] | None
) -> None:
    """One pair of brackets around an IPv6 host is removed, nothing else is guessed."""
    assert split_host_port(text, lowest=lowest) == expected
