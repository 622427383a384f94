"""Private keys: ECDSA P-256 (the default, Linkerd-compatible) and ML-DSA-65 (post-quantum)."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa

from pki.errors import KeyLoadError, UnsupportedAlgorithm

PrivateKeyTypes = ec.EllipticCurvePrivateKey | mldsa.MLDSA65PrivateKey
PublicKeyTypes = ec.EllipticCurvePublicKey | mldsa.MLDSA65PublicKey
_PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


class KeyAlgorithm(enum.Enum):
    """Signature key algorithms TrustMesh issues and accepts."""

    ECDSA_P256 = "ecdsa-p256"
    ML_DSA_65 = "ml-dsa-65"

    @classmethod
    def parse(cls, value: str) -> KeyAlgorithm:
        try:
            return cls(value.lower())
        except ValueError:
            choices = ", ".join(a.value for a in cls)
            raise UnsupportedAlgorithm(
                f"unknown key algorithm {value!r}; choose one of {choices}"
            ) from None

    def signature_hash(self) -> hashes.SHA256 | None:
        """The hash passed to ``sign``: SHA-256 for ECDSA, None for ML-DSA (pure signing)."""
        return hashes.SHA256() if self is KeyAlgorithm.ECDSA_P256 else None


def algorithm_of(key: Any) -> KeyAlgorithm:
    """The :class:`KeyAlgorithm` of a private or public key object; raise if unsupported."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return KeyAlgorithm.ECDSA_P256
        raise UnsupportedAlgorithm(f"ECDSA curve {key.curve.name} is not supported; use P-256")
    if isinstance(key, mldsa.MLDSA65PrivateKey | mldsa.MLDSA65PublicKey):
        return KeyAlgorithm.ML_DSA_65
    raise UnsupportedAlgorithm(
        f"key type {type(key).__name__} is not supported; use ECDSA P-256 or ML-DSA-65"
    )


def spki_der(public_key: Any) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key object."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True, slots=True, repr=False)
class PrivateKey:
    """A private signing key. Its repr never shows key material."""

    key: PrivateKeyTypes

    def __post_init__(self) -> None:
        algorithm_of(self.key)

    def __repr__(self) -> str:
        return f"PrivateKey({self.algorithm.value})"

    @classmethod
    def generate(cls, algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256) -> PrivateKey:
        if not isinstance(algorithm, KeyAlgorithm):
            raise TypeError(f"algorithm must be a KeyAlgorithm, not {type(algorithm).__name__}")
        if algorithm is KeyAlgorithm.ECDSA_P256:
            return cls(ec.generate_private_key(ec.SECP256R1()))
        return cls(mldsa.MLDSA65PrivateKey.generate())

    @property
    def algorithm(self) -> KeyAlgorithm:
        return algorithm_of(self.key)

    def public_key(self) -> PublicKeyTypes:
        return self.key.public_key()

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            return self.key.sign(data, ec.ECDSA(hashes.SHA256()))
        return self.key.sign(data)

    def to_pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted (stores protect it with file modes, 0600)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def to_der(self) -> bytes:
        """PKCS#8 DER (Linkerd's ``key.p8``)."""
        return self.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_key_der(self) -> bytes:
        return spki_der(self.public_key())

    @classmethod
    def load(cls, data: bytes) -> PrivateKey:
        """Load a PEM (PKCS#8 or SEC1 ``EC PRIVATE KEY``) or DER PKCS#8 private key."""
        if not isinstance(data, bytes | bytearray):
            raise TypeError(f"key data must be bytes, not {type(data).__name__}")
        if b"-----BEGIN" in data:
            # cryptography takes the first key of a PEM holding several: refuse the guess.
            count = len(_PEM_PRIVATE_KEY.findall(bytes(data)))
            if count > 1:
                raise KeyLoadError(f"the PEM data holds {count} private keys; expected one")
        try:
            if b"-----BEGIN" in data:
                key = serialization.load_pem_private_key(bytes(data), password=None)
            else:
                key = serialization.load_der_private_key(bytes(data), password=None)
        except (ValueError, TypeError) as e:
            raise KeyLoadError(f"cannot load private key: {_first_line(e)}") from None
        except Exception as e:  # cryptography raises UnsupportedAlgorithm for exotic keys
            raise KeyLoadError(f"cannot load private key: {_first_line(e)}") from None
        return cls(key)  # type: ignore[arg-type]

    def matches(self, public_key: Any) -> bool:
        """True when ``public_key`` is this key's public half."""
        try:
            other = spki_der(public_key)
        except AttributeError:
            return False
        return other == self.public_key_der()


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
