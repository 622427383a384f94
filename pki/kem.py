"""Hybrid KEM sealing: X25519 + ML-KEM-768, HKDF-SHA256, AES-256-GCM.

Used to hand key material across an untrusted channel (an issuer key for a cluster, a backup of
an anchor key). Sealing stays confidential as long as *either* X25519 or ML-KEM-768 holds.

Key files are armored (PEM-like, base64 of a binary body)::

    -----BEGIN TRUSTMESH KEM PUBLIC KEY-----      body: version 0x01 | suite 0x01 |
    ...                                                  X25519 public (32) | ML-KEM-768 ek (1184)
    -----END TRUSTMESH KEM PUBLIC KEY-----
    -----BEGIN TRUSTMESH KEM PRIVATE KEY-----     body: version 0x01 | suite 0x01 |
    ...                                                  X25519 private (32) | ML-KEM-768 seed (64)
    -----END TRUSTMESH KEM PRIVATE KEY-----

A sealed envelope (binary, version 1)::

    offset  size  field
    0       8     b"TMSEAL", version 0x01, suite 0x01
    8       8     key id: SHA-256(public key body)[:8], names the recipient key
    16      32    ephemeral X25519 public key
    48      1088  ML-KEM-768 ciphertext
    1136    12    AES-GCM nonce (random)
    1148    n+16  AES-256-GCM ciphertext of the payload, with its tag

The AES key is HKDF-SHA256(ikm = ML-KEM secret || X25519 secret, salt = SHA-256(ephemeral X25519
public || ML-KEM ciphertext), info = label || recipient public key body): both ciphertexts and
both recipient public keys are bound into the key (the combiner is secure if either KEM is), and
the 1148-byte header is the AEAD's associated data, so changing any byte is detected.

ML-KEM comes from pyca/cryptography. liboqs-python is an optional second backend, used only when
the liboqs shared library is already installed: without it ``import oqs`` tries to download and
build liboqs and then raises ``SystemExit``, so this module never imports ``oqs`` unless
``ctypes.util.find_library("oqs")`` finds the library.
"""

from __future__ import annotations

import base64
import binascii
import ctypes.util
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pki.errors import KEMError
from pki.store import write_files_atomic

KEY_VERSION = 1
SUITE_X25519_MLKEM768_HKDF_SHA256_AES256GCM = 1
MAGIC = b"TMSEAL"
_HKDF_LABEL = b"trustmesh-kem-v1 X25519+ML-KEM-768 HKDF-SHA256 AES-256-GCM"

X25519_LEN = 32
MLKEM_PUBLIC_LEN = 1184
MLKEM_SEED_LEN = 64
MLKEM_CIPHERTEXT_LEN = 1088
NONCE_LEN = 12
TAG_LEN = 16
KEY_ID_LEN = 8
HEADER_LEN = len(MAGIC) + 2 + KEY_ID_LEN + X25519_LEN + MLKEM_CIPHERTEXT_LEN + NONCE_LEN
MAX_PAYLOAD = 64 * 1024 * 1024  # key material is small; refuse to buffer anything absurd

_PUBLIC_LABEL = "TRUSTMESH KEM PUBLIC KEY"
_PRIVATE_LABEL = "TRUSTMESH KEM PRIVATE KEY"


# --- ML-KEM backends --------------------------------------------------------------------------


class MLKEMBackend(Protocol):
    """ML-KEM-768 from a seed (the private key form stored in key files)."""

    name: str

    def public_from_seed(self, seed: bytes) -> bytes: ...

    def encapsulate(self, public: bytes) -> tuple[bytes, bytes]:
        """Return ``(shared_secret, ciphertext)``."""
        ...

    def decapsulate(self, seed: bytes, ciphertext: bytes) -> bytes: ...


class CryptographyBackend:
    """ML-KEM-768 from pyca/cryptography (the OpenSSL 4 it bundles). Always available."""

    name = "cryptography"

    def public_from_seed(self, seed: bytes) -> bytes:
        return mlkem.MLKEM768PrivateKey.from_seed_bytes(seed).public_key().public_bytes_raw()

    def encapsulate(self, public: bytes) -> tuple[bytes, bytes]:
        shared, ciphertext = mlkem.MLKEM768PublicKey.from_public_bytes(public).encapsulate()
        return shared, ciphertext

    def decapsulate(self, seed: bytes, ciphertext: bytes) -> bytes:
        return mlkem.MLKEM768PrivateKey.from_seed_bytes(seed).decapsulate(ciphertext)


class LiboqsBackend:
    """ML-KEM-768 from liboqs-python. Construct only through :func:`get_backend`."""

    name = "liboqs"
    _ALG = "ML-KEM-768"

    def __init__(self, oqs_module: Any) -> None:
        self._oqs = oqs_module

    def _kem_from_seed(self, seed: bytes) -> tuple[Any, bytes]:
        kem = self._oqs.KeyEncapsulation(self._ALG)
        public = kem.generate_keypair_seed(seed)
        return kem, bytes(public)

    def public_from_seed(self, seed: bytes) -> bytes:
        kem, public = self._kem_from_seed(seed)
        kem.free()
        return public

    def encapsulate(self, public: bytes) -> tuple[bytes, bytes]:
        with self._oqs.KeyEncapsulation(self._ALG) as kem:
            ciphertext, shared = kem.encap_secret(public)
        return bytes(shared), bytes(ciphertext)

    def decapsulate(self, seed: bytes, ciphertext: bytes) -> bytes:
        kem, _ = self._kem_from_seed(seed)
        try:
            return bytes(kem.decap_secret(ciphertext))
        finally:
            kem.free()


def liboqs_library(
    find_library: Callable[[str], str | None] = ctypes.util.find_library,
) -> str | None:
    """Where the liboqs shared library is, or None. Never imports ``oqs``."""
    return find_library("oqs")


def available_backends(
    find_library: Callable[[str], str | None] = ctypes.util.find_library,
) -> tuple[str, ...]:
    """Backend names usable here: always ``cryptography``; ``liboqs`` only if its library exists."""
    return ("cryptography", "liboqs") if liboqs_library(find_library) else ("cryptography",)


def get_backend(
    name: str = "cryptography",
    *,
    find_library: Callable[[str], str | None] = ctypes.util.find_library,
) -> MLKEMBackend:
    """The ML-KEM backend called ``name``; raise :class:`KEMError` if it cannot be used here."""
    if name == "cryptography":
        return CryptographyBackend()
    if name != "liboqs":
        raise KEMError(f"unknown KEM backend {name!r}; choose cryptography or liboqs")
    if liboqs_library(find_library) is None:
        raise KEMError(
            "the liboqs backend is unavailable: the liboqs shared library is not installed "
            "(ctypes.util.find_library('oqs') found nothing); use the cryptography backend"
        )
    try:
        import oqs  # only reached when the liboqs library is installed
    except (ImportError, SystemExit, RuntimeError, OSError) as e:
        # liboqs-python raises SystemExit when it cannot load the library; never let it escape.
        raise KEMError(f"the liboqs backend is unavailable: cannot import oqs ({e!r})") from None
    return LiboqsBackend(oqs)


# --- keys ------------------------------------------------------------------------------------


def _armor(label: str, body: bytes) -> bytes:
    b64 = base64.b64encode(body).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""]).encode()


def _dearmor(label: str, data: bytes, what: str) -> bytes:
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"{what} must be bytes, not {type(data).__name__}")
    try:
        text = bytes(data).decode("ascii").strip()
    except UnicodeDecodeError:
        raise KEMError(f"{what} is not an armored TrustMesh KEM key (not ASCII)") from None
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    if not text.startswith(begin) or not text.endswith(end):
        other = _PRIVATE_LABEL if label == _PUBLIC_LABEL else _PUBLIC_LABEL
        if f"-----BEGIN {other}-----" in text:
            raise KEMError(f"{what} is a {other.lower()}, not a {label.lower()}")
        raise KEMError(f"{what} is not an armored {label.lower()} ('{begin}' ... '{end}')")
    try:
        return base64.b64decode("".join(text[len(begin) : -len(end)].split()), validate=True)
    except binascii.Error:
        raise KEMError(f"{what} has invalid base64 between its armor lines") from None


def _check_body(body: bytes, expected_len: int, what: str) -> bytes:
    if len(body) < 2:
        raise KEMError(f"{what} is truncated")
    if body[0] != KEY_VERSION:
        raise KEMError(f"{what} has version {body[0]}; this TrustMesh reads version {KEY_VERSION}")
    if body[1] != SUITE_X25519_MLKEM768_HKDF_SHA256_AES256GCM:
        raise KEMError(f"{what} uses unknown suite {body[1]}")
    if len(body) != expected_len + 2:
        raise KEMError(f"{what} is {len(body) - 2} bytes long, expected {expected_len}")
    return body[2:]


@dataclass(frozen=True, slots=True)
class KEMPublicKey:
    """A recipient's hybrid public key: X25519 and ML-KEM-768 encapsulation key."""

    x25519: bytes
    mlkem: bytes

    def __post_init__(self) -> None:
        if len(self.x25519) != X25519_LEN:
            raise ValueError(f"x25519 public key must be {X25519_LEN} bytes")
        if len(self.mlkem) != MLKEM_PUBLIC_LEN:
            raise ValueError(f"ML-KEM-768 public key must be {MLKEM_PUBLIC_LEN} bytes")

    @property
    def body(self) -> bytes:
        return bytes((KEY_VERSION, SUITE_X25519_MLKEM768_HKDF_SHA256_AES256GCM)) + (
            self.x25519 + self.mlkem
        )

    @property
    def key_id(self) -> bytes:
        return hashlib.sha256(self.body).digest()[:KEY_ID_LEN]

    def to_armored(self) -> bytes:
        return _armor(_PUBLIC_LABEL, self.body)

    @classmethod
    def from_armored(cls, data: bytes) -> KEMPublicKey:
        raw = _check_body(
            _dearmor(_PUBLIC_LABEL, data, "public key"), X25519_LEN + MLKEM_PUBLIC_LEN, "public key"
        )
        return cls(raw[:X25519_LEN], raw[X25519_LEN:])


@dataclass(frozen=True, slots=True, repr=False)
class KEMPrivateKey:
    """A hybrid private key: X25519 private bytes and the ML-KEM-768 seed. Repr hides both."""

    x25519: bytes
    mlkem_seed: bytes

    def __post_init__(self) -> None:
        if len(self.x25519) != X25519_LEN:
            raise ValueError(f"x25519 private key must be {X25519_LEN} bytes")
        if len(self.mlkem_seed) != MLKEM_SEED_LEN:
            raise ValueError(f"ML-KEM-768 seed must be {MLKEM_SEED_LEN} bytes")

    def __repr__(self) -> str:
        return f"KEMPrivateKey(key_id={self.public_key().key_id.hex()})"

    @classmethod
    def generate(cls) -> KEMPrivateKey:
        x = x25519.X25519PrivateKey.generate().private_bytes_raw()
        return cls(x, secrets.token_bytes(MLKEM_SEED_LEN))

    def public_key(self, backend: MLKEMBackend | None = None) -> KEMPublicKey:
        x_pub = x25519.X25519PrivateKey.from_private_bytes(self.x25519).public_key()
        mlkem_pub = (backend or CryptographyBackend()).public_from_seed(self.mlkem_seed)
        return KEMPublicKey(x_pub.public_bytes_raw(), mlkem_pub)

    def to_armored(self) -> bytes:
        body = bytes((KEY_VERSION, SUITE_X25519_MLKEM768_HKDF_SHA256_AES256GCM))
        return _armor(_PRIVATE_LABEL, body + self.x25519 + self.mlkem_seed)

    @classmethod
    def from_armored(cls, data: bytes) -> KEMPrivateKey:
        raw = _check_body(
            _dearmor(_PRIVATE_LABEL, data, "private key"),
            X25519_LEN + MLKEM_SEED_LEN,
            "private key",
        )
        return cls(raw[:X25519_LEN], raw[X25519_LEN:])


def write_keypair(key: KEMPrivateKey, private_path: Path, public_path: Path) -> KEMPublicKey:
    """Write the private key (0600, atomically) and its public key (0644, atomically)."""
    public = key.public_key()
    write_files_atomic(
        [
            (Path(private_path), key.to_armored(), 0o600),
            (Path(public_path), public.to_armored(), 0o644),
        ]
    )
    return public


# --- sealing ---------------------------------------------------------------------------------


def _derive_key(
    mlkem_ss: bytes, x_ss: bytes, eph: bytes, ct: bytes, recipient: KEMPublicKey
) -> bytes:
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=hashlib.sha256(eph + ct).digest(),
        info=_HKDF_LABEL + recipient.body,
    )
    return hkdf.derive(mlkem_ss + x_ss)


def _prefix() -> bytes:
    return MAGIC + bytes((KEY_VERSION, SUITE_X25519_MLKEM768_HKDF_SHA256_AES256GCM))


def seal(payload: bytes, recipient: KEMPublicKey, *, backend: MLKEMBackend | None = None) -> bytes:
    """Encrypt ``payload`` so that only the holder of ``recipient``'s private key can read it."""
    if not isinstance(payload, bytes | bytearray):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
    if len(payload) > MAX_PAYLOAD:
        raise KEMError(f"payload is {len(payload)} bytes, over the limit of {MAX_PAYLOAD}")
    kem = backend or CryptographyBackend()
    eph = x25519.X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes_raw()
    try:
        x_ss = eph.exchange(x25519.X25519PublicKey.from_public_bytes(recipient.x25519))
        mlkem_ss, ct = kem.encapsulate(recipient.mlkem)
    except ValueError as e:
        raise KEMError(f"the recipient public key is unusable: {e}") from None
    nonce = secrets.token_bytes(NONCE_LEN)
    header = _prefix() + recipient.key_id + eph_pub + ct + nonce
    key = _derive_key(mlkem_ss, x_ss, eph_pub, ct, recipient)
    return header + AESGCM(key).encrypt(nonce, bytes(payload), header)


@dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """The parsed, not yet authenticated, header of a sealed envelope."""

    version: int
    suite: int
    key_id: bytes
    ephemeral: bytes
    ciphertext: bytes
    nonce: bytes


def parse_envelope(data: bytes) -> tuple[EnvelopeHeader, bytes]:
    """Split an envelope into its header and the AEAD ciphertext; raise KEMError if malformed."""
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"envelope must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if not data.startswith(MAGIC):
        raise KEMError("not a TrustMesh sealed envelope (missing the TMSEAL magic)")
    if len(data) < len(MAGIC) + 2:
        raise KEMError("sealed envelope is truncated")
    version, suite = data[len(MAGIC)], data[len(MAGIC) + 1]
    if version != KEY_VERSION:
        raise KEMError(f"sealed envelope has version {version}; this TrustMesh reads {KEY_VERSION}")
    if suite != SUITE_X25519_MLKEM768_HKDF_SHA256_AES256GCM:
        raise KEMError(f"sealed envelope uses unknown suite {suite}")
    if len(data) < HEADER_LEN + TAG_LEN:
        raise KEMError(
            f"sealed envelope is truncated: {len(data)} bytes, at least {HEADER_LEN + TAG_LEN} needed"
        )
    pos = len(MAGIC) + 2
    fields = []
    for size in (KEY_ID_LEN, X25519_LEN, MLKEM_CIPHERTEXT_LEN, NONCE_LEN):
        fields.append(data[pos : pos + size])
        pos += size
    return EnvelopeHeader(version, suite, *fields), data[HEADER_LEN:]


def unseal(envelope: bytes, key: KEMPrivateKey, *, backend: MLKEMBackend | None = None) -> bytes:
    """Decrypt an envelope made by :func:`seal`; raise :class:`KEMError` on any problem."""
    header, sealed = parse_envelope(envelope)
    kem = backend or CryptographyBackend()
    recipient = key.public_key(kem)
    if header.key_id != recipient.key_id:
        raise KEMError(
            f"the envelope is sealed to key {header.key_id.hex()}, "
            f"but this private key is {recipient.key_id.hex()} (wrong key)"
        )
    try:
        x_ss = x25519.X25519PrivateKey.from_private_bytes(key.x25519).exchange(
            x25519.X25519PublicKey.from_public_bytes(header.ephemeral)
        )
        mlkem_ss = kem.decapsulate(key.mlkem_seed, header.ciphertext)
    except ValueError as e:
        raise KEMError(f"the envelope was tampered with: {e}") from None
    aes = AESGCM(_derive_key(mlkem_ss, x_ss, header.ephemeral, header.ciphertext, recipient))
    try:
        return aes.decrypt(header.nonce, sealed, bytes(envelope[:HEADER_LEN]))
    except InvalidTag:
        raise KEMError(
            "the envelope does not authenticate: it was tampered with or truncated"
        ) from None


def public_key_fingerprint(key: KEMPublicKey) -> str:
    """The key id as hex, shown to people to compare keys."""
    return key.key_id.hex()


__all__ = [
    "CryptographyBackend",
    "EnvelopeHeader",
    "KEMPrivateKey",
    "KEMPublicKey",
    "available_backends",
    "get_backend",
    "parse_envelope",
    "seal",
    "unseal",
    "write_keypair",
]
