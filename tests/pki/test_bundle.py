"""Trust bundles: several anchors, a digest stable under reordering, add/remove rules."""

from __future__ import annotations

import pytest
from pki_testkit import Chain, build_chain

from pki.bundle import TrustBundle
from pki.errors import BundleError
from pki.keys import KeyAlgorithm

OTHER = build_chain(KeyAlgorithm.ECDSA_P256)


def test_digest_is_stable_under_reordering_and_formatting(chain: Chain) -> None:
    a, b = chain.anchor.certificate, OTHER.anchor.certificate
    ab, ba = TrustBundle((a, b)), TrustBundle((b, a))
    assert ab.digest == ba.digest
    assert ab.pem() != ba.pem()
    # comments and blank lines between PEM blocks do not matter either
    messy = b"# anchors\n\n" + b.pem + b"\nsome text\n" + a.pem
    assert TrustBundle.from_pem(messy).digest == ab.digest
    assert TrustBundle((a,)).digest != ab.digest


def test_add_find_remove(chain: Chain) -> None:
    a, b = chain.anchor.certificate, OTHER.anchor.certificate
    bundle = TrustBundle((a,)).add(b)
    assert bundle.fingerprints == (a.fingerprint, b.fingerprint)
    assert b in bundle and chain.leaf.certificate not in bundle
    assert bundle.find(b.fingerprint[:10]) == b
    assert bundle.find(b.fingerprint.upper()[:10]) == b
    assert bundle.remove(a.fingerprint).anchors == (b,)
    assert bundle.earliest_expiry() == min(a.not_after, b.not_after)
    with pytest.raises(BundleError, match="already"):
        bundle.add(a)
    with pytest.raises(BundleError, match="no anchor"):
        bundle.find("00" * 32)
    with pytest.raises(BundleError, match="empty"):
        bundle.find("")
    with pytest.raises(BundleError, match="last anchor"):
        TrustBundle((a,)).remove(a.fingerprint)


def test_invalid_bundles(chain: Chain) -> None:
    with pytest.raises(BundleError, match="at least one"):
        TrustBundle(())
    with pytest.raises(BundleError, match="not a CA"):
        TrustBundle((chain.leaf.certificate,))
    with pytest.raises(BundleError, match="twice"):
        TrustBundle((chain.anchor.certificate, chain.anchor.certificate))
    with pytest.raises(TypeError):
        TrustBundle([chain.anchor.certificate])  # type: ignore[arg-type]
    assert TrustBundle.of([chain.anchor.certificate] * 2).anchors == (chain.anchor.certificate,)


def test_find_with_an_empty_fingerprint_says_so(chain: Chain) -> None:
    # 'bundle remove ""' (or ":") said "1 anchors in the bundle match fingerprint ''".
    bundle = TrustBundle((chain.anchor.certificate,))
    with pytest.raises(BundleError, match="fingerprint is empty"):
        bundle.find("")
