from __future__ import annotations

import pytest
from alerts_testkit import Chain, ts

from alerts.errors import SourceError
from alerts.inventory import Reading, build_inventory, cert_times, classify


def test_classify(chain: Chain) -> None:
    assert classify(chain.anchor.certificate) == "trust_anchor"
    assert classify(chain.issuer.certificate) == "issuer"
    assert classify(chain.workload.certificate) == "workload"
    assert classify(chain.webhook.certificate) == "webhook"
    assert classify(chain.other.certificate) == "other"


def test_cert_times_use_the_role_policy(chain: Chain) -> None:
    issuer = cert_times(chain.issuer.certificate, "issuer", "store:x")
    life = issuer.not_after - issuer.not_before
    assert issuer.renewal_due == pytest.approx(issuer.not_before + life * 2 / 3)
    assert issuer.not_after == ts(chain.issuer.certificate)
    assert issuer.fingerprint == chain.issuer.certificate.fingerprint
    workload = cert_times(chain.workload.certificate, "workload", "probe:x")
    life = workload.not_after - workload.not_before
    assert workload.renewal_due == pytest.approx(workload.not_before + life * 0.7)
    with pytest.raises(ValueError, match="role"):
        cert_times(chain.issuer.certificate, "intermediate", "x")


def test_build_inventory_dedupes_and_records_errors(chain: Chain) -> None:
    anchor = chain.anchor.certificate
    reading = Reading(
        ((anchor, "trust_anchor"), (anchor, "trust_anchor"), (chain.issuer.certificate, "issuer")),
        "d1",
    )
    inventory = build_inventory(5.0, [("store:a", reading), ("file:b", SourceError("b is gone"))])
    assert inventory.taken_at == 5.0
    assert [c.role for c in inventory.certs] == ["trust_anchor", "issuer"]
    assert inventory.bundles == (("d1", "store:a"),)
    assert [(s.source, s.ok) for s in inventory.sources] == [("store:a", True), ("file:b", False)]
    assert inventory.errors[0].error == "b is gone"
