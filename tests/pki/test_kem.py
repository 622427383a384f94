"""Hybrid KEM sealing: round trips, every refusal as KEMError, key files, backend selection."""

from __future__ import annotations

import ctypes.util
import importlib.abc
import os
import stat
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pki import kem
from pki.errors import KEMError
from pki.kem import (
    HEADER_LEN,
    KEMPrivateKey,
    KEMPublicKey,
    available_backends,
    get_backend,
    parse_envelope,
    seal,
    unseal,
    write_keypair,
)

KEY = KEMPrivateKey.generate()
PUB = KEY.public_key()
OTHER = KEMPrivateKey.generate()


@pytest.mark.parametrize("size", [0, 1, 4096, 100_000])
def test_round_trip(size: int) -> None:
    payload = os.urandom(size)
    envelope = seal(payload, PUB)
    assert len(envelope) == HEADER_LEN + size + 16
    assert unseal(envelope, KEY) == payload


def test_each_seal_is_fresh() -> None:
    a, b = seal(b"same", PUB), seal(b"same", PUB)
    assert a != b
    assert parse_envelope(a)[0].ciphertext != parse_envelope(b)[0].ciphertext


def test_wrong_key_is_named() -> None:
    with pytest.raises(KEMError, match="wrong key"):
        unseal(seal(b"secret", PUB), OTHER)


def test_same_x25519_different_mlkem_key_is_refused() -> None:
    # A key that shares the X25519 half but not the ML-KEM half must not open the envelope:
    # the hybrid needs both secrets.
    half = KEMPrivateKey(KEY.x25519, OTHER.mlkem_seed)
    with pytest.raises(KEMError):
        unseal(seal(b"secret", PUB), half)


@pytest.mark.parametrize(
    "offset",
    [
        8,  # key id
        16,  # ephemeral X25519 key
        48 + 500,  # ML-KEM ciphertext
        1136,  # nonce
        HEADER_LEN,  # payload ciphertext
        -1,  # tag
    ],
)
def test_tampering_anywhere_is_detected(offset: int) -> None:
    envelope = bytearray(seal(b"issuer key material", PUB))
    envelope[offset] ^= 0x01
    with pytest.raises(KEMError):
        unseal(bytes(envelope), KEY)


@pytest.mark.parametrize("cut", [0, 5, 7, 100, HEADER_LEN, HEADER_LEN + 15])
def test_truncated_envelope(cut: int) -> None:
    envelope = seal(b"x" * 64, PUB)
    with pytest.raises(KEMError, match=r"truncated|not a TrustMesh"):
        unseal(envelope[:cut], KEY)


def test_truncated_payload_fails_authentication() -> None:
    envelope = seal(b"x" * 64, PUB)
    with pytest.raises(KEMError, match="tampered with or truncated"):
        unseal(envelope[:-10], KEY)


def test_wrong_format_and_version() -> None:
    with pytest.raises(KEMError, match="not a TrustMesh sealed envelope"):
        unseal(PUB.to_armored(), KEY)
    envelope = bytearray(seal(b"x", PUB))
    envelope[6] = 9
    with pytest.raises(KEMError, match="version 9"):
        unseal(bytes(envelope), KEY)
    envelope[6], envelope[7] = 1, 7
    with pytest.raises(KEMError, match="unknown suite 7"):
        unseal(bytes(envelope), KEY)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_only_raise_kem_error(data: bytes) -> None:
    with pytest.raises(KEMError):
        unseal(kem.MAGIC + b"\x01\x01" + data, KEY)


def test_armored_keys_round_trip_and_hide_secrets() -> None:
    assert KEMPublicKey.from_armored(PUB.to_armored()) == PUB
    loaded = KEMPrivateKey.from_armored(KEY.to_armored())
    assert loaded == KEY
    assert KEY.x25519.hex() not in repr(KEY)
    assert PUB.key_id.hex() in repr(KEY)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xfe", "not ASCII"),
        (b"hello", "not an armored"),
        (KEY.to_armored(), "private key, not a"),
        (
            b"-----BEGIN TRUSTMESH KEM PUBLIC KEY-----\n!!!\n-----END TRUSTMESH KEM PUBLIC KEY-----",
            "base64",
        ),
        (
            b"-----BEGIN TRUSTMESH KEM PUBLIC KEY-----\nAQE=\n-----END TRUSTMESH KEM PUBLIC KEY-----",
            "expected",
        ),
        (
            b"-----BEGIN TRUSTMESH KEM PUBLIC KEY-----\nAgE=\n-----END TRUSTMESH KEM PUBLIC KEY-----",
            "version 2",
        ),
    ],
)
def test_bad_public_key_files(data: bytes, message: str) -> None:
    with pytest.raises(KEMError, match=message):
        KEMPublicKey.from_armored(data)


def test_public_key_is_not_a_private_key() -> None:
    with pytest.raises(KEMError, match="public key, not a"):
        KEMPrivateKey.from_armored(PUB.to_armored())


def test_write_keypair_modes(tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    root = Path(tmp_path)
    pub = write_keypair(KEY, root / "k.key", root / "k.pub")
    assert pub == PUB
    assert stat.S_IMODE((root / "k.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "k.pub").stat().st_mode) == 0o644
    assert sorted(p.name for p in root.iterdir()) == ["k.key", "k.pub"]
    assert KEMPrivateKey.from_armored((root / "k.key").read_bytes()) == KEY


# --- backends ---------------------------------------------------------------------------------


def _no_library(name: str) -> str | None:
    return None


def test_liboqs_unavailable_without_the_library() -> None:
    assert available_backends(_no_library) == ("cryptography",)
    with pytest.raises(KEMError, match="liboqs shared library is not installed"):
        get_backend("liboqs", find_library=_no_library)
    assert "oqs" not in sys.modules


@pytest.mark.skipif(ctypes.util.find_library("oqs") is not None, reason="liboqs is installed")
def test_real_environment_reports_liboqs_unavailable() -> None:
    assert available_backends() == ("cryptography",)
    with pytest.raises(KEMError, match="unavailable"):
        get_backend("liboqs")


class _RefuseOqs(importlib.abc.MetaPathFinder):
    """Test double standing in for a broken liboqs-python: records and refuses ``import oqs``."""

    def __init__(self) -> None:
        self.attempts = 0

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname == "oqs":
            self.attempts += 1
            raise ImportError("oqs refused by the test")
        return None


def test_liboqs_import_failure_becomes_kem_error(monkeypatch: pytest.MonkeyPatch) -> None:
    finder = _RefuseOqs()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    monkeypatch.delitem(sys.modules, "oqs", raising=False)
    with pytest.raises(KEMError, match="cannot import oqs"):
        get_backend("liboqs", find_library=lambda name: "/usr/lib/liboqs.so")
    assert finder.attempts == 1
    # and without the library the import is never even attempted
    with pytest.raises(KEMError):
        get_backend("liboqs", find_library=_no_library)
    assert finder.attempts == 1


def test_unknown_backend() -> None:
    with pytest.raises(KEMError, match="unknown KEM backend"):
        get_backend("openssl-cli")


def test_sealing_never_imports_oqs() -> None:
    code = textwrap.dedent(
        """
        import sys
        from pki import kem
        k = kem.KEMPrivateKey.generate()
        assert kem.unseal(kem.seal(b"x", k.public_key()), k) == b"x"
        kem.available_backends()
        try:
            kem.get_backend("liboqs")
        except kem.KEMError:
            pass
        assert "oqs" not in sys.modules, "oqs was imported"
        print("ok")
        """
    )
    if ctypes.util.find_library("oqs") is not None:
        pytest.skip("liboqs is installed; importing oqs is then allowed")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
