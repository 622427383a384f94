"""The Certify decision at explicit times, without gRPC: order of checks and each refusal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from identity_testkit import Env, csr_for, identity, make_env
from pki_testkit import hand_built_issuer

from identity import errors
from identity.errors import status_of
from identity.issuer import Issuer, check_issuer
from identity.service import Certifier, IssuancePolicy
from pki.bundle import TrustBundle
from pki.certs import Certificate, Credential, create_anchor, create_issuer
from pki.csr import parse_csr, validate_csr
from pki.errors import (
    CSRIdentityMismatch,
    CSRKeyNotAllowed,
    CSRMalformed,
    CSRSignatureInvalid,
    CSRTooLarge,
)
from pki.keys import KeyAlgorithm, PrivateKey
from pki.tokens import TokenExpired
from pki.verify import verify_leaf
from protos.rpc import StatusCode

T0 = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def tenv(tmp_path: Path) -> Env:
    return make_env(tmp_path / "store", T0)


def certifier(env: Env, at: datetime, policy: IssuancePolicy | None = None) -> Certifier:
    c = Certifier(policy or IssuancePolicy(), env.validator(lambda: at), clock=lambda: at)
    state = env.store.load()
    assert state.issuer is not None and state.bundle is not None
    c.set_issuer(check_issuer(state.issuer, state.bundle, source="test", at=T0))
    return c


async def test_issues_a_leaf_that_verifies(tenv: Env) -> None:
    at = T0 + timedelta(minutes=1)
    c = certifier(tenv, at)
    name = identity()
    issued = await c.certify(name, tenv.token(issued=at), csr_for(name))
    bundle = tenv.store.load().require_bundle()
    verify_leaf(issued.leaf, issued.chain, bundle, at=at, expected_identity=name)
    assert issued.valid_until == issued.leaf.not_after
    assert issued.valid_until - at == timedelta(hours=24, seconds=20)  # lifetime + skew
    assert issued.chain_der == tuple(x.der for x in issued.chain)
    assert not issued.leaf.is_ca


async def test_lifetime_and_skew_are_configurable(tenv: Env) -> None:
    c = certifier(tenv, T0, IssuancePolicy(lifetime=timedelta(hours=1), clock_skew=timedelta(0)))
    name = identity()
    issued = await c.certify(name, tenv.token(), csr_for(name))
    assert issued.leaf.not_before == T0
    assert issued.leaf.not_after == T0 + timedelta(hours=1)


async def test_not_ready_before_an_issuer(tenv: Env) -> None:
    c = Certifier(IssuancePolicy(), tenv.validator(), clock=lambda: T0)
    assert not c.is_ready(T0)
    with pytest.raises(errors.IssuerNotReady, match="not ready"):
        await c.certify(identity(), tenv.token(), csr_for(identity()))


@pytest.mark.parametrize(
    ("field", "expected"),
    [("identity", "missing identity"), ("token", "missing token"), ("csr", "missing certificate")],
)
async def test_missing_fields(tenv: Env, field: str, expected: str) -> None:
    c = certifier(tenv, T0)
    args = {"identity": identity(), "token": tenv.token(), "csr": csr_for(identity())}
    args[field] = "" if field == "identity" else b""
    with pytest.raises(errors.InvalidRequest, match=expected):
        await c.certify(args["identity"], args["token"], args["csr"])  # type: ignore[arg-type]


async def test_size_limits_before_parsing(tenv: Env) -> None:
    c = certifier(tenv, T0, IssuancePolicy(max_csr_bytes=100, max_token_bytes=50))
    with pytest.raises(CSRTooLarge, match="over the limit of 100"):
        await c.certify(identity(), tenv.token()[:50], b"\x30" * 101)
    with pytest.raises(errors.RequestTooLarge, match="token is 51 bytes"):
        await c.certify(identity(), b"x" * 51, b"\x30")
    with pytest.raises(errors.RequestTooLarge, match="identity is 254"):
        await c.certify("a" * 254, b"x", b"\x30")


async def test_csr_refusals(tenv: Env) -> None:
    c = certifier(tenv, T0)
    name, tok = identity(), tenv.token()
    with pytest.raises(CSRMalformed):
        await c.certify(name, tok, b"\x30\x03\x02\x01\x00")
    with pytest.raises(CSRIdentityMismatch, match="requested identity"):
        await c.certify(name, tok, csr_for(identity("api")))
    with pytest.raises(CSRKeyNotAllowed, match="ml-dsa-65 is not allowed"):
        await c.certify(name, tok, csr_for(name, KeyAlgorithm.ML_DSA_65))
    good = bytearray(csr_for(name))
    good[-5] ^= 0xFF  # corrupt the signature
    with pytest.raises((CSRSignatureInvalid, CSRMalformed)):
        await c.certify(name, tok, bytes(good))


async def test_csr_must_be_der(tenv: Env) -> None:
    # The wire carries DER (Linkerd's proxy sends csr.der; its controller refuses anything
    # else); a PEM CSR is refused rather than quietly accepted.
    import base64

    c = certifier(tenv, T0)
    name = identity()
    body64 = base64.encodebytes(csr_for(name))
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n" + body64 + b"-----END CERTIFICATE REQUEST-----\n"
    for body in (pem, b"\n" + pem):
        with pytest.raises(errors.InvalidRequest, match="not DER"):
            await c.certify(name, tenv.token(), body)
    assert status_of(errors.InvalidRequest("x"))[0].name == "INVALID_ARGUMENT"


async def test_ml_dsa_allowed_when_configured(tenv: Env) -> None:
    policy = IssuancePolicy(allowed_algorithms=(KeyAlgorithm.ECDSA_P256, KeyAlgorithm.ML_DSA_65))
    c = certifier(tenv, T0, policy)
    name = identity()
    issued = await c.certify(name, tenv.token(), csr_for(name, KeyAlgorithm.ML_DSA_65))
    assert issued.leaf.key_algorithm is KeyAlgorithm.ML_DSA_65


async def test_token_for_another_service_account_is_refused(tenv: Env) -> None:
    c = certifier(tenv, T0)
    victim = identity("db", "prod")
    with pytest.raises(errors.IdentityMismatch, match="did not match"):
        await c.certify(victim, tenv.token("web", "default"), csr_for(victim))


async def test_check_order_csr_before_token(tenv: Env) -> None:
    # Linkerd's order: a bad CSR is reported even when the token is also bad.
    c = certifier(tenv, T0)
    with pytest.raises(CSRIdentityMismatch):
        await c.certify(identity(), b"garbage", csr_for(identity("api")))
    expired = tenv.token(issued=T0 - timedelta(hours=2))
    with pytest.raises(TokenExpired):
        await c.certify(identity(), expired, csr_for(identity()))


async def test_expired_issuer_is_refused_per_request(tenv: Env) -> None:
    late = T0 + timedelta(hours=49)
    c = certifier(tenv, late)
    assert not c.is_ready(late)
    with pytest.raises(errors.IssuerInvalid, match="load a new issuer"):
        await c.certify(identity(), tenv.token(issued=late), csr_for(identity()))


def test_leaf_is_clamped_to_issuer_expiry(tenv: Env) -> None:
    import asyncio

    at = T0 + timedelta(hours=40)  # the 48h issuer has 8h left
    c = certifier(tenv, at)
    name = identity()
    issued = asyncio.run(c.certify(name, tenv.token(issued=at), csr_for(name)))
    assert issued.leaf.not_after == c.issuer.not_after  # type: ignore[union-attr]


def test_status_mapping_is_total() -> None:
    cases = {
        errors.IssuerNotReady("x"): StatusCode.UNAVAILABLE,
        errors.RequestTooLarge("x"): StatusCode.RESOURCE_EXHAUSTED,
        CSRTooLarge("x"): StatusCode.RESOURCE_EXHAUSTED,
        CSRMalformed("x"): StatusCode.INVALID_ARGUMENT,
        CSRSignatureInvalid("x"): StatusCode.FAILED_PRECONDITION,
        TokenExpired("x"): StatusCode.FAILED_PRECONDITION,
        errors.TokenInvalid("x"): StatusCode.INVALID_ARGUMENT,
        errors.IdentityMismatch("x"): StatusCode.FAILED_PRECONDITION,
        errors.TokenReviewFailed("x"): StatusCode.INTERNAL,
    }
    for error, code in cases.items():
        assert status_of(error)[0] is code, error
    code, message, result = status_of(KeyError("secret stuff"))
    assert code is StatusCode.INTERNAL and "secret" not in message and result == "internal"


async def test_policy_refuses_a_window_it_could_not_issue(tenv: Env) -> None:
    # Accepted at startup, these made every Certify fail INTERNAL (the date arithmetic
    # overflowed).
    for kw, text in [
        ({"lifetime": timedelta(days=99_999_999)}, "issuance lifetime .* at most 3650 days"),
        ({"clock_skew": timedelta(days=99_999_999)}, "clock skew .* between 0 and 3650 days"),
        ({"clock_skew": timedelta(seconds=-1)}, "clock skew"),
    ]:
        with pytest.raises(ValueError, match=text):
            IssuancePolicy(**kw)  # type: ignore[arg-type]
    longest = IssuancePolicy(lifetime=timedelta(days=3650), clock_skew=timedelta(days=3650))
    IssuancePolicy(lifetime=timedelta(seconds=10))  # a skew (20 s) longer than the lifetime is fine
    c = certifier(tenv, T0, longest)
    issued = await c.certify(identity(), tenv.token(), csr_for(identity()))
    assert issued.leaf.not_after == c.issuer.not_after  # type: ignore[union-attr]


async def test_a_renewal_resending_its_csr_skips_only_the_repeated_checks(
    tenv: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy sends the same CSR on every renewal. Its parse and signature check are
    remembered for those exact bytes and that identity, and for nothing else: the token, the
    identity and the issuer are still checked on every request, and refusals are not kept."""
    import identity.service as service

    checked: list[bytes] = []

    def counting(parsed, **kw):  # type: ignore[no-untyped-def]
        checked.append(parsed.signature)  # which CSR: its signature bytes
        return validate_csr(parsed, **kw)

    monkeypatch.setattr(service, "validate_csr", counting)
    monkeypatch.setattr(service, "CSR_CACHE_SIZE", 2)
    c = certifier(tenv, T0)
    web, api = identity(), identity("api")
    csr = csr_for(web)
    first = await c.certify(web, tenv.token(), csr)
    again = await c.certify(web, tenv.token(), csr)
    assert len(checked) == 1
    assert again.leaf.fingerprint != first.leaf.fingerprint  # a new certificate each time
    assert again.leaf.x509.public_key() == first.leaf.x509.public_key()
    # Remembered for web only: asked for api, the same bytes are checked (and refused).
    with pytest.raises(CSRIdentityMismatch):
        await c.certify(api, tenv.token("api"), csr)
    with pytest.raises(errors.IdentityMismatch):
        await c.certify(web, tenv.token("api"), csr)
    late = certifier(tenv, T0 + timedelta(hours=49))
    late._validated = c._validated  # even with the CSR remembered
    with pytest.raises(errors.IssuerInvalid):
        await late.certify(web, tenv.token(issued=T0 + timedelta(hours=49)), csr)
    # A valid CSR in a request whose token does not prove its identity is not remembered:
    # such requests cannot push the proxies' CSRs out.
    checked.clear()
    stranger = csr_for(web)
    with pytest.raises(errors.IdentityMismatch):
        await c.certify(web, tenv.token("api"), stranger)
    await c.certify(web, tenv.token(), stranger)
    assert checked == [parse_csr(stranger).signature] * 2
    # A refused CSR is checked again each time.
    bad = bytearray(csr_for(web))
    bad[-5] ^= 0xFF
    for _ in range(2):
        with pytest.raises((CSRSignatureInvalid, CSRMalformed)):
            await c.certify(web, tenv.token(), bytes(bad))
    # At most CSR_CACHE_SIZE remembered, least recently used out first.
    checked.clear()
    others = [csr_for(web), csr_for(web)]
    for other in others:
        await c.certify(web, tenv.token(), other)
    await c.certify(web, tenv.token(), others[1])  # still there
    await c.certify(web, tenv.token(), csr)  # evicted: checked again
    assert checked == [parse_csr(x).signature for x in (*others, csr)]


def _same_named_anchors(
    old_left: timedelta, issuer_lifetime: timedelta = timedelta(hours=48)
) -> tuple[Issuer, Certificate, Certificate]:
    """An old anchor with ``old_left`` to live and a new one with the same (default) name, the
    old one first in the bundle, and an issuer the new one signed."""
    old_key, new_key = PrivateKey.generate(), PrivateKey.generate()
    old = create_anchor(
        old_key, now=T0 - timedelta(days=365) + old_left, lifetime=timedelta(days=365)
    )
    new = create_anchor(new_key, now=T0, lifetime=timedelta(days=365))
    assert old.subject == new.subject
    cred = create_issuer(
        PrivateKey.generate(), Credential(new, new_key), now=T0, lifetime=issuer_lifetime
    )
    return check_issuer(cred, TrustBundle.of([old, new]), source="test", at=T0), old, new


async def test_an_old_same_named_anchor_does_not_cap_the_new_issuer(tenv: Env) -> None:
    # After a rotation the old anchor stays in the bundle until the proxies move over; with the
    # default anchor name it has the new one's subject. Matched by name, its NotAfter capped
    # the new issuer's window, and identity refused every Certify once it expired.
    issuer, old, new = _same_named_anchors(old_left=timedelta(hours=2))
    later = T0 + timedelta(hours=3)  # the old anchor has expired, the new issuer has 45 h left
    assert issuer.bundle.anchors[0] == old and old.not_after < later
    c = Certifier(IssuancePolicy(), tenv.validator(lambda: later), clock=lambda: later)
    c.set_issuer(issuer)
    assert c.anchor == new
    assert c.is_ready(later)
    name = identity()
    issued = await c.certify(name, tenv.token(issued=later), csr_for(name))
    assert issued.valid_until == later + timedelta(hours=24, seconds=20)
    verify_leaf(issued.leaf, issued.chain, TrustBundle.of([new]), at=later, expected_identity=name)


async def test_leaf_is_clamped_to_the_anchor_when_the_issuer_outlives_it(tenv: Env) -> None:
    # An issuer from outside the store (cert-manager's, say) may be valid longer than its
    # anchor; a leaf past the anchor would be reported valid when no peer can verify it.
    key = PrivateKey.generate()
    anchor = create_anchor(key, now=T0 - timedelta(days=365), lifetime=timedelta(days=365, hours=6))
    cred = create_issuer(PrivateKey.generate(), Credential(anchor, key), now=T0)
    # create_issuer clamps to its parent; rebuild it unclamped, as an outside CA may.
    assert cred.certificate.not_after == anchor.not_after
    unclamped = hand_built_issuer(
        Credential(anchor, key),
        not_before=T0 - timedelta(minutes=1),
        not_after=T0 + timedelta(hours=48),
    )
    issuer = check_issuer(unclamped, TrustBundle.of([anchor]), source="test", at=T0)
    at = T0 + timedelta(hours=1)
    c = Certifier(IssuancePolicy(), tenv.validator(lambda: at), clock=lambda: at)
    c.set_issuer(issuer)
    name = identity()
    issued = await c.certify(name, tenv.token(issued=at), csr_for(name))
    assert issued.leaf.not_after == anchor.not_after
    assert issued.valid_until == anchor.not_after
    assert not c.is_ready(anchor.not_after + timedelta(seconds=1))
