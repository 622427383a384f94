"""Local workload tokens: ES256 compact JWS, verified at explicit times."""

from __future__ import annotations

import base64
import json
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pki import tokens
from pki.errors import StoreNotInitialized, TokenError
from pki.keys import KeyAlgorithm, PrivateKey
from pki.store import FileStore

T0 = datetime(2030, 1, 1, tzinfo=UTC)
AUD = "identity.l5d.io"


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    return PrivateKey.generate()


def claims(**overrides: object) -> tokens.TokenClaims:
    values: dict[str, object] = {
        "subject": "system:serviceaccount:default:web",
        "audience": AUD,
        "issued_at": T0,
        "expires_at": T0 + timedelta(hours=1),
    }
    values.update(overrides)
    return tokens.TokenClaims(**values)  # type: ignore[arg-type]


def b64(obj: object) -> bytes:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=")


def test_round_trip(key: PrivateKey) -> None:
    token = tokens.sign_token(claims(), key)
    got = tokens.verify_token(token, key, audience=AUD, now=T0 + timedelta(minutes=5))
    assert got.subject == "system:serviceaccount:default:web"
    assert got.expires_at == T0 + timedelta(hours=1)
    header = json.loads(base64.urlsafe_b64decode(token.split(b".")[0] + b"=="))
    assert header == {"alg": "ES256", "typ": "JWT", "kid": tokens.key_id(key)}


@pytest.mark.parametrize(
    ("at", "error", "text"),
    [
        (T0 + timedelta(hours=1), tokens.TokenExpired, "expired"),
        (T0 - timedelta(seconds=1), tokens.TokenNotYetValid, "not valid before"),
    ],
)
def test_validity_window(key: PrivateKey, at: datetime, error: type, text: str) -> None:
    token = tokens.sign_token(claims(), key)
    with pytest.raises(error, match=text):
        tokens.verify_token(token, key, audience=AUD, now=at)


def test_not_before_claim(key: PrivateKey) -> None:
    token = tokens.sign_token(claims(not_before=T0 + timedelta(minutes=10)), key)
    with pytest.raises(tokens.TokenNotYetValid):
        tokens.verify_token(token, key, audience=AUD, now=T0 + timedelta(minutes=9))
    tokens.verify_token(token, key, audience=AUD, now=T0 + timedelta(minutes=10))


def test_wrong_audience_and_issuer(key: PrivateKey) -> None:
    token = tokens.sign_token(claims(audience="kubernetes.default.svc"), key)
    with pytest.raises(tokens.TokenAudienceMismatch, match=r"kubernetes\.default\.svc"):
        tokens.verify_token(token, key, audience=AUD, now=T0)
    token = tokens.sign_token(claims(issuer="someone-else"), key)
    with pytest.raises(tokens.TokenIssuerMismatch, match="someone-else"):
        tokens.verify_token(token, key, audience=AUD, now=T0)
    # a 5,000-character audience (the token is under its 8 KiB limit) is quoted, not echoed
    token = tokens.sign_token(claims(audience="x" * 5000), key)
    with pytest.raises(tokens.TokenAudienceMismatch) as e:
        tokens.verify_token(token, key, audience=AUD, now=T0)
    assert len(str(e.value)) < 200 and "(5000 characters)" in str(e.value)


def test_forged_signature_and_foreign_key(key: PrivateKey) -> None:
    token = tokens.sign_token(claims(), key)
    head, _, sig = token.split(b".")
    altered = head + b"." + b64({"iss": "trustmesh-identity", "sub": "system:serviceaccount:kube-system:admin",
                                 "aud": AUD, "iat": 1893456000, "exp": 1893459600}) + b"." + sig  # fmt: skip
    with pytest.raises(tokens.TokenSignatureInvalid, match="forged or altered"):
        tokens.verify_token(altered, key, audience=AUD, now=T0)
    other = tokens.sign_token(claims(), PrivateKey.generate())
    with pytest.raises(tokens.TokenSignatureInvalid, match="not this control plane's key"):
        tokens.verify_token(other, key, audience=AUD, now=T0)


@pytest.mark.parametrize(
    "token",
    [
        b"",
        b"abc",
        b"a.b",
        b"a..c",
        b"!!!.e30.AAAA",
        b64({"alg": "none", "typ": "JWT"}) + b"." + b64({"sub": "x"}) + b".AAAA",
        b64({"alg": "HS256"}) + b"." + b64({"sub": "x"}) + b".AAAA",
        b"x" * (tokens.MAX_TOKEN_BYTES + 1),
    ],
)
def test_malformed(key: PrivateKey, token: bytes) -> None:
    with pytest.raises(tokens.TokenMalformed):
        tokens.verify_token(token, key, audience=AUD, now=T0)


def test_bad_claims_are_malformed(key: PrivateKey) -> None:
    header = {"alg": "ES256", "typ": "JWT", "kid": tokens.key_id(key)}
    good = {
        "iss": "trustmesh-identity",
        "sub": "x",
        "aud": AUD,
        "iat": 1893456000,
        "exp": 1893459600,
    }
    for bad, text in (
        ({"iat": "soon"}, "'iat'"),
        ({"aud": ["a", "b"]}, "'aud'"),
        ({"sub": ""}, "'sub'"),
        ({"exp": 1893456000}, "not after"),
    ):
        token = tokens.sign_compact(header, {**good, **bad}, key)
        with pytest.raises(tokens.TokenMalformed, match=text):
            tokens.verify_token(token, key, audience=AUD, now=T0)


def test_all_failures_are_token_errors() -> None:
    for cls in (tokens.TokenMalformed, tokens.TokenExpired, tokens.TokenSignatureInvalid):
        assert issubclass(cls, TokenError)


def test_claims_validation() -> None:
    with pytest.raises(ValueError, match="subject"):
        claims(subject="")
    with pytest.raises(ValueError, match="after issued_at"):
        claims(expires_at=T0)
    with pytest.raises(TypeError, match="P-256"):
        tokens.sign_token(claims(), PrivateKey.generate(KeyAlgorithm.ML_DSA_65))


def test_signing_key_created_once_in_store(make_store: Callable[..., FileStore]) -> None:
    store = make_store()
    before = store.current_version()
    first = tokens.token_signing_key(store, now=T0)
    assert store.current_version() == (before or 0) + 1
    again = tokens.token_signing_key(store, now=T0)
    assert again.public_key_der() == first.public_key_der()
    assert store.current_version() == (before or 0) + 1
    path = Path(store.root) / "current" / tokens.TOKEN_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.load().issuer is not None  # the commit kept the rest of the store


def test_signing_key_needs_initialized_store(tmp_path: Path) -> None:
    with pytest.raises(StoreNotInitialized):
        tokens.token_signing_key(FileStore(tmp_path / "empty"), now=T0)
