from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from alerts_testkit import NOW, Chain, http_server, silent_server, tls_server

from alerts.errors import SourceError
from alerts.inventory import build_inventory
from alerts.sources import (
    FileSource,
    ProbeSource,
    ProxySource,
    StoreSource,
    parse_address,
    sources_from,
    split_role,
)
from pki.certs import chain_pem
from pki.rotation import init_anchor, issue_issuer
from pki.store import FileStore


def test_store_source_reads_anchors_issuer_and_bundle_digest(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    init_anchor(store, now=NOW)
    state = issue_issuer(store, now=NOW, lifetime=timedelta(hours=48))
    reading = StoreSource(store.root).read()
    roles = [(c.fingerprint, role) for c, role in reading.certificates]
    assert roles == [
        (state.anchor.fingerprint, "trust_anchor"),  # type: ignore[union-attr]
        (state.issuer.certificate.fingerprint, "issuer"),  # type: ignore[union-attr]
    ]
    assert reading.bundle_digest == state.bundle.digest  # type: ignore[union-attr]
    assert StoreSource(store.root).name == f"store:{store.root}"


def test_store_source_errors_name_the_store(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot read the store"):
        StoreSource(tmp_path / "none").read()


def test_file_source_pem_chain_der_and_directory(tmp_path: Path, chain: Chain) -> None:
    (tmp_path / "chain.pem").write_bytes(chain_pem(chain.webhook.full_chain))
    (tmp_path / "anchor.der").write_bytes(chain.anchor.certificate.der)
    (tmp_path / "notes.txt").write_text("not a certificate, and not scanned")
    single = FileSource(tmp_path / "chain.pem").read()
    assert [r for _, r in single.certificates] == ["webhook", "issuer"]
    forced = FileSource(tmp_path / "anchor.der", role="other").read()
    assert [r for _, r in forced.certificates] == ["other"]
    everything = FileSource(tmp_path).read()
    assert sorted(r for _, r in everything.certificates) == ["issuer", "trust_anchor", "webhook"]


def test_file_source_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        FileSource(tmp_path / "missing.pem").read()
    (tmp_path / "bad.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(SourceError, match=r"bad\.pem holds no readable certificate"):
        FileSource(tmp_path / "bad.pem").read()


def test_a_key_beside_its_certificate_is_skipped_and_a_bad_file_spares_the_others(
    tmp_path: Path, chain: Chain
) -> None:
    # Linkerd's issuer directory: crt.pem and key.pem. The key file used to fail the whole
    # directory, so the issuer beside it went unwatched; likewise one unreadable file.
    (tmp_path / "crt.pem").write_bytes(chain.issuer.certificate.pem)
    (tmp_path / "key.pem").write_bytes(chain.issuer.key.to_pem())
    linkerd = FileSource(tmp_path).read()
    assert [c for c, _ in linkerd.certificates] == [chain.issuer.certificate]
    assert linkerd.errors == ()
    with pytest.raises(SourceError, match=r"key\.pem holds no certificate"):
        FileSource(tmp_path / "key.pem").read()  # named on its own, it is a mistake
    (tmp_path / "broken.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"
    )
    partial = FileSource(tmp_path).read()
    assert [c for c, _ in partial.certificates] == [chain.issuer.certificate]
    (error,) = partial.errors
    assert "broken.pem holds no readable certificate" in error
    inventory = build_inventory(0.0, [("file:dir", partial)])
    (status,) = inventory.sources
    assert not status.ok and "broken.pem" in status.error and status.certificates == 1
    assert [c.fingerprint for c in inventory.certs] == [chain.issuer.certificate.fingerprint]
    trusted = chain.anchor.certificate.pem.replace(b"CERTIFICATE", b"TRUSTED CERTIFICATE")
    (tmp_path / "trusted.pem").write_bytes(trusted)  # OpenSSL's trusted form: named, not skipped
    with pytest.raises(SourceError, match="not in 'BEGIN CERTIFICATE' PEM blocks"):
        FileSource(tmp_path / "trusted.pem").read()
    (tmp_path / "trusted.pem").unlink()
    (tmp_path / "crt.pem").unlink()
    with pytest.raises(SourceError, match=r"broken\.pem holds no readable certificate"):
        FileSource(tmp_path).read()  # nothing readable at all: the source fails outright


def test_probe_reads_the_presented_chain_over_real_tls(chain: Chain) -> None:
    with tls_server(chain.workload) as address:
        reading = ProbeSource(address).read()
        assert [(c, r) for c, r in reading.certificates] == [
            (chain.workload.certificate, "workload"),
            (chain.issuer.certificate, "issuer"),
        ]
        forced = ProbeSource(address, role="webhook").read()
        assert forced.certificates[0][1] == "webhook"


def test_probe_failures_are_bounded_and_named() -> None:
    with silent_server() as address:
        started = time.monotonic()
        with pytest.raises(SourceError, match="timed out"):
            ProbeSource(address, timeout=0.5).read()
        assert time.monotonic() - started < 2
    with silent_server() as address:
        pass  # closed: nothing listens there any more
    with pytest.raises(SourceError, match="cannot connect"):
        ProbeSource(address).read()


@pytest.mark.parametrize("bad", ["localhost", ":443", "host:http", "host:0", "host:70000"])
def test_parse_address_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_address(bad)


def test_parse_address_and_roles() -> None:
    assert parse_address("[::1]:4191") == ("::1", 4191)
    assert parse_address("0.0.0.0:0", allow_port_zero=True) == ("0.0.0.0", 0)
    assert split_role("webhook=/etc/tls.crt") == ("webhook", "/etc/tls.crt")
    assert split_role("/etc/a=b.crt") == (None, "/etc/a=b.crt")
    with pytest.raises(ValueError, match="nothing after"):
        split_role("issuer=")
    names = [s.name for s in sources_from(Path("/s"), ["other=/f.pem"], ["h:1"])]
    assert names == ["store:/s", "file:/f.pem", "probe:h:1"]


def test_proxy_source_reads_the_reported_workload_certificate(chain: Chain) -> None:
    with http_server(lambda _path: (200, chain.workload.chain_pem())) as addr:
        reading = ProxySource(addr).read()
    roles = [(cert.fingerprint, role) for cert, role in reading.certificates]
    assert roles == [
        (chain.workload.certificate.fingerprint, "workload"),
        (chain.issuer.certificate.fingerprint, "issuer"),
    ]
    assert ProxySource(addr).name == f"proxy:{addr}"
    assert [s.name for s in sources_from(None, proxies=[addr])] == [f"proxy:{addr}"]


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (503, b"no certificate yet\n", "answered 503"),
        (200, b"not a certificate", "no valid certificate"),
        (200, b"x" * (300 * 1024), "over"),
    ],
)
def test_proxy_source_refusals_are_named(status: int, body: bytes, message: str) -> None:
    with (
        http_server(lambda _path: (status, body)) as addr,
        pytest.raises(SourceError, match=message),
    ):
        ProxySource(addr).read()


def test_proxy_source_unreachable_is_a_source_error() -> None:
    with silent_server() as addr, pytest.raises(SourceError, match="cannot read"):
        ProxySource(addr, timeout=0.3).read()
