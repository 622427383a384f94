"""Keys: generation, PEM/DER round trips, refusal of unsupported algorithms, no key in repr."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from pki.errors import KeyLoadError, UnsupportedAlgorithm
from pki.keys import KeyAlgorithm, PrivateKey, algorithm_of


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_generate_round_trip_and_sign(algorithm: KeyAlgorithm) -> None:
    key = PrivateKey.generate(algorithm)
    assert key.algorithm is algorithm
    for data in (key.to_pem(), key.to_der()):
        loaded = PrivateKey.load(data)
        assert loaded.public_key_der() == key.public_key_der()
        assert loaded.matches(key.public_key())
    assert key.sign(b"message")
    assert repr(key) == f"PrivateKey({algorithm.value})"
    assert b"PRIVATE" not in repr(key).encode()


def test_signature_hash() -> None:
    assert KeyAlgorithm.ECDSA_P256.signature_hash() is not None
    assert KeyAlgorithm.ML_DSA_65.signature_hash() is None


def test_parse_algorithm() -> None:
    assert KeyAlgorithm.parse("ML-DSA-65") is KeyAlgorithm.ML_DSA_65
    with pytest.raises(UnsupportedAlgorithm, match="ecdsa-p256, ml-dsa-65"):
        KeyAlgorithm.parse("rsa-2048")


def test_sec1_pem_loads() -> None:
    raw = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert PrivateKey.load(raw).algorithm is KeyAlgorithm.ECDSA_P256


@pytest.mark.parametrize(
    "key", [ec.generate_private_key(ec.SECP384R1()), ed25519.Ed25519PrivateKey.generate()]
)
def test_unsupported_keys(key: object) -> None:
    with pytest.raises(UnsupportedAlgorithm):
        algorithm_of(key)
    with pytest.raises(UnsupportedAlgorithm):
        PrivateKey(key)  # type: ignore[arg-type]


def test_matches_other_key_and_non_keys() -> None:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    assert not a.matches(b.public_key())
    assert not a.matches("not a key")


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=600))
def test_load_garbage_raises_key_load_error(data: bytes) -> None:
    with pytest.raises(KeyLoadError):
        PrivateKey.load(data)


def test_load_pem_garbage_and_types() -> None:
    with pytest.raises(KeyLoadError):
        PrivateKey.load(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(TypeError):
        PrivateKey.load("pem")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        PrivateKey.generate("ecdsa-p256")  # type: ignore[arg-type]


def test_a_pem_with_two_private_keys_is_refused() -> None:
    # cryptography silently loads the first key of such a file; which one was meant is a guess.
    first, second = PrivateKey.generate(), PrivateKey.generate(KeyAlgorithm.ML_DSA_65)
    with pytest.raises(KeyLoadError, match="2 private keys"):
        PrivateKey.load(first.to_pem() + second.to_pem())
    # One key beside certificates (a combined cert + key file) is fine.
    cert_block = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    assert PrivateKey.load(cert_block + first.to_pem()).matches(first.public_key())
