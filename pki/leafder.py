"""Workload leaves assembled directly in DER: the identity service's signing hot path.

``cryptography``'s CertificateBuilder costs ~90 µs per leaf here, of which ~23 µs is the P-256
signature; the rest is building and encoding Python objects that are the same for every leaf
of one issuer. A :class:`LeafTemplate` encodes those parts once per issuer certificate (issuer
name, signature algorithm, the fixed extensions, the AKI) and each leaf only encodes what
differs: serial, validity, subject, public key, SAN and SKI. The result is byte for byte the
certificate :func:`pki.certs.issue_leaf` builds with CertificateBuilder for the same serial and
times (tests/pki/test_leafder.py compares the to-be-signed bytes).

Only the handful of DER forms a leaf needs are written: definite lengths, tags below 31.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509

from pki.keys import KeyAlgorithm, PrivateKey

# Universal and context tags used below.
_INTEGER, _BIT_STRING, _OCTET_STRING, _OID = 0x02, 0x03, 0x04, 0x06
_UTF8_STRING, _UTC_TIME, _GENERALIZED_TIME = 0x0C, 0x17, 0x18
_SEQUENCE, _SET = 0x30, 0x31
_DNS_NAME, _URI = 0x82, 0x86  # GeneralName [2] dNSName, [6] uniformResourceIdentifier (implicit)
_VERSION_V3 = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT INTEGER 2
_CRITICAL = b"\x01\x01\xff"  # BOOLEAN TRUE (FALSE is the default and omitted)

# AlgorithmIdentifier of the issuer's signature: ecdsa-with-SHA256 (1.2.840.10045.4.3.2, no
# parameters, RFC 5758) and id-ml-dsa-65 (2.16.840.1.101.3.4.3.18, parameters absent, RFC 9881).
_SIGNATURE_ALGORITHMS = {
    KeyAlgorithm.ECDSA_P256: bytes.fromhex("300a06082a8648ce3d040302"),
    KeyAlgorithm.ML_DSA_65: bytes.fromhex("300b0609608648016503040312"),
}
_OID_COMMON_NAME = bytes.fromhex("0603550403")
_OID_SAN = bytes.fromhex("0603551d11")
_OID_SKI = bytes.fromhex("0603551d0e")
_GENERALIZED_FROM_YEAR = 2050  # RFC 5280 §4.1.2.5: UTCTime through 2049


def _length(n: int) -> bytes:
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, value: bytes) -> bytes:
    """One DER element: tag, definite length, value."""
    n = len(value)
    if n < 0x80:  # short form, the common case: one call instead of three
        return bytes((tag, n)) + value
    return bytes((tag,)) + _length(n) + value


def integer(n: int) -> bytes:
    """A non-negative INTEGER in its shortest two's-complement form."""
    if n < 0:
        raise ValueError(f"only non-negative integers are encoded here, got {n}")
    return tlv(_INTEGER, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def time_value(t: datetime) -> bytes:
    """UTCTime before 2050, GeneralizedTime from 2050 on, in whole seconds (RFC 5280)."""
    t = t.astimezone(UTC)
    clock = f"{t.month:02}{t.day:02}{t.hour:02}{t.minute:02}{t.second:02}Z"
    if t.year < _GENERALIZED_FROM_YEAR:
        return tlv(_UTC_TIME, f"{t.year % 100:02}{clock}".encode())
    return tlv(_GENERALIZED_TIME, f"{t.year:04}{clock}".encode())


def _extension(oid: bytes, value: bytes, *, critical: bool = False) -> bytes:
    return tlv(_SEQUENCE, oid + (_CRITICAL if critical else b"") + tlv(_OCTET_STRING, value))


def _builder_extension(ext: x509.Extension[x509.ExtensionType]) -> bytes:
    oid = tlv(_OID, _oid_body(ext.oid.dotted_string))
    return _extension(oid, ext.value.public_bytes(), critical=ext.critical)


def _oid_body(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for arc in (40 * arcs[0] + arcs[1], *arcs[2:]):  # X.690 §8.19: first two arcs combined
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


def key_identifier(spki_der: bytes) -> bytes:
    """RFC 5280 §4.2.1.2 method 1: SHA-1 of the subjectPublicKey BIT STRING's bits."""
    # SubjectPublicKeyInfo ::= SEQUENCE { algorithm AlgorithmIdentifier, subjectPublicKey BIT
    # STRING }: skip the outer header and the algorithm, then the BIT STRING's header and its
    # unused-bits octet.
    pos = _header_end(spki_der, 0)
    pos = _element_end(spki_der, pos)
    if spki_der[pos] != _BIT_STRING:
        raise ValueError("SubjectPublicKeyInfo has no BIT STRING after its algorithm")
    bits = _header_end(spki_der, pos) + 1
    return hashlib.sha1(spki_der[bits:], usedforsecurity=False).digest()


def _header_end(der: bytes, pos: int) -> int:
    first = der[pos + 1]
    if first < 0x80:
        return pos + 2
    return pos + 2 + (first & 0x7F)


def _element_end(der: bytes, pos: int) -> int:
    first = der[pos + 1]
    if first < 0x80:
        return pos + 2 + first
    count = first & 0x7F
    return pos + 2 + count + int.from_bytes(der[pos + 2 : pos + 2 + count], "big")


@dataclass(frozen=True, slots=True)
class LeafTemplate:
    """The parts of every leaf one issuer signs that do not change between leaves."""

    signature_algorithm: bytes
    issuer_name: bytes
    static_extensions: bytes  # BasicConstraints, KeyUsage, ExtendedKeyUsage, in that order
    aki_extension: bytes
    signer: PrivateKey = field(repr=False)

    @classmethod
    def build(
        cls,
        signer: PrivateKey,
        issuer_name: x509.Name,
        static_extensions: tuple[x509.Extension[x509.ExtensionType], ...],
        aki: x509.Extension[x509.ExtensionType],
    ) -> LeafTemplate:
        return cls(
            signature_algorithm=_SIGNATURE_ALGORITHMS[signer.algorithm],
            issuer_name=issuer_name.public_bytes(),
            static_extensions=b"".join(_builder_extension(e) for e in static_extensions),
            aki_extension=_builder_extension(aki),
            signer=signer,
        )

    def tbs(
        self,
        *,
        serial: int,
        not_before: datetime,
        not_after: datetime,
        dns_name: str,
        spki_der: bytes,
        spiffe_id: str | None = None,
    ) -> bytes:
        """The TBSCertificate of a leaf for ``dns_name`` (CN when it fits 64 characters)."""
        name = dns_name.encode("ascii")
        if len(dns_name) <= 64:
            cn = tlv(_SEQUENCE, _OID_COMMON_NAME + tlv(_UTF8_STRING, name))
            subject = tlv(_SEQUENCE, tlv(_SET, cn))
        else:
            subject = b"\x30\x00"
        general_names = tlv(_DNS_NAME, name)
        if spiffe_id:
            general_names += tlv(_URI, spiffe_id.encode("ascii"))
        extensions = (
            self.static_extensions
            + _extension(_OID_SAN, tlv(_SEQUENCE, general_names))
            + _extension(_OID_SKI, tlv(_OCTET_STRING, key_identifier(spki_der)))
            + self.aki_extension
        )
        validity = tlv(_SEQUENCE, time_value(not_before) + time_value(not_after))
        return tlv(
            _SEQUENCE,
            _VERSION_V3
            + integer(serial)
            + self.signature_algorithm
            + self.issuer_name
            + validity
            + subject
            + spki_der
            + tlv(0xA3, tlv(_SEQUENCE, extensions)),
        )

    def sign(self, tbs: bytes) -> bytes:
        """The Certificate: ``tbs``, the algorithm and the issuer's signature over ``tbs``."""
        signature = tlv(_BIT_STRING, b"\x00" + self.signer.sign(tbs))
        return tlv(_SEQUENCE, tbs + self.signature_algorithm + signature)
