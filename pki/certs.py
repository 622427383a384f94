"""Certificates: a frozen wrapper around X.509, and the builders for anchors, issuers and leaves.

Rules (design.md): NotBefore is backdated by a clock-skew allowance; a certificate's NotAfter is
clamped so that it never outlives any certificate of its issuer chain; serials are random 128
bits; SKI and AKI are always set (the cryptography verifier and most TLS stacks need them).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property, lru_cache

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm as CryptoUnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from pki.errors import CertificateBuildError, CertificateParseError, KeyLoadError
from pki.keys import KeyAlgorithm, PrivateKey, PublicKeyTypes, algorithm_of, spki_der
from pki.leafder import LeafTemplate
from pki.names import Identity

X509Certificate = x509.Certificate
X509SubjectAltName = x509.SubjectAlternativeName

DEFAULT_CLOCK_SKEW = timedelta(seconds=20)
DEFAULT_LEAF_LIFETIME = timedelta(hours=24)
DEFAULT_ISSUER_LIFETIME = timedelta(hours=48)
DEFAULT_ANCHOR_LIFETIME = timedelta(days=365)


@dataclass(frozen=True, eq=False)
class Certificate:
    """An immutable X.509 certificate. Equality and hashing follow the DER bytes."""

    der: bytes
    x509: X509Certificate = field(repr=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Certificate) and other.der == self.der

    def __hash__(self) -> int:
        return hash(self.der)

    def __repr__(self) -> str:
        return f"Certificate(subject={self.subject!r}, not_after={self.not_after.isoformat()})"

    # --- loading ------------------------------------------------------------------------

    @classmethod
    def from_x509(cls, cert: X509Certificate) -> Certificate:
        """Wrap a certificate object from elsewhere (a file, a TLS peer), checking it parses."""
        _check_parses(cert)
        return cls(cert.public_bytes(serialization.Encoding.DER), cert)

    @classmethod
    def from_der(cls, der: bytes) -> Certificate:
        try:
            cert = x509.load_der_x509_certificate(bytes(der))
        except (ValueError, x509.InvalidVersion) as e:  # InvalidVersion is not a ValueError
            raise CertificateParseError(f"not a DER certificate: {e}") from None
        _check_parses(cert)
        return cls(bytes(der), cert)

    @classmethod
    def from_pem(cls, pem: bytes) -> Certificate:
        chain = load_pem_chain(pem)
        if len(chain) != 1:
            raise CertificateParseError(f"expected one PEM certificate, found {len(chain)}")
        return chain[0]

    @classmethod
    def load(cls, data: bytes) -> Certificate:
        """Load one certificate from PEM or DER bytes."""
        return cls.from_pem(data) if b"-----BEGIN" in data else cls.from_der(data)

    # --- properties -----------------------------------------------------------------------

    @property
    def pem(self) -> bytes:
        return self.x509.public_bytes(serialization.Encoding.PEM)

    @property
    def subject(self) -> str:
        return self.x509.subject.rfc4514_string()

    @property
    def issuer(self) -> str:
        return self.x509.issuer.rfc4514_string()

    @property
    def common_name(self) -> str | None:
        attrs = self.x509.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else None

    @property
    def not_before(self) -> datetime:
        return self.x509.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.x509.not_valid_after_utc

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.not_before

    @property
    def serial(self) -> int:
        return self.x509.serial_number

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the DER encoding, lower-case hex."""
        return hashlib.sha256(self.der).hexdigest()

    @property
    def key_algorithm(self) -> KeyAlgorithm:
        return algorithm_of(self.x509.public_key())

    @property
    def signature_algorithm(self) -> str:
        oid = self.x509.signature_algorithm_oid
        return getattr(oid, "_name", None) or oid.dotted_string

    @property
    def is_ca(self) -> bool:
        try:
            return bool(
                self.x509.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            )
        except x509.ExtensionNotFound:
            return False

    @property
    def path_length(self) -> int | None:
        try:
            bc = self.x509.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            return None
        return bc.path_length

    @property
    def is_self_signed(self) -> bool:
        return self.x509.subject == self.x509.issuer

    def _san(self) -> X509SubjectAltName | None:
        try:
            return self.x509.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return None

    @property
    def dns_names(self) -> tuple[str, ...]:
        san = self._san()
        return tuple(san.get_values_for_type(x509.DNSName)) if san else ()

    @property
    def uris(self) -> tuple[str, ...]:
        san = self._san()
        return tuple(san.get_values_for_type(x509.UniformResourceIdentifier)) if san else ()

    @property
    def identities(self) -> tuple[str, ...]:
        """DNS and URI SANs, the names a mesh peer may be identified by."""
        return self.dns_names + self.uris

    def is_valid_at(self, at: datetime) -> bool:
        return self.not_before <= at <= self.not_after

    def public_key_der(self) -> bytes:
        return spki_der(self.x509.public_key())


def load_pem_chain(data: bytes) -> tuple[Certificate, ...]:
    """All certificates of a PEM bundle, in file order. Raises if there is none."""
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"PEM data must be bytes, not {type(data).__name__}")
    try:
        certs = x509.load_pem_x509_certificates(bytes(data))
    except (ValueError, x509.InvalidVersion) as e:
        raise CertificateParseError(f"no valid PEM certificate found: {_pem_problem(e)}") from None
    return tuple(Certificate.from_x509(c) for c in certs)


_FAQ = (
    "Unable to load PEM file. See https://cryptography.io/en/latest/faq/"
    "#why-can-t-i-import-my-pem-file for more details."
)


def _pem_problem(e: Exception) -> str:
    """cryptography's reason without its FAQ link, in words where it is a bare code."""
    text = str(e).replace(_FAQ, "").strip()
    if text == "MalformedFraming":
        return "no complete BEGIN/END CERTIFICATE block"
    if text.startswith("InvalidData("):
        return f"a certificate block is not valid base64 DER ({text[12:-1]})"
    return text or str(e)


def _check_parses(cert: X509Certificate) -> None:
    """Parse what cryptography parses lazily, so that a malformed certificate is refused on
    load with CertificateParseError instead of failing later in an unrelated property."""
    try:
        cert.extensions  # noqa: B018
        cert.subject  # noqa: B018
        cert.issuer  # noqa: B018
        cert.public_key()
    except (ValueError, x509.DuplicateExtension, CryptoUnsupportedAlgorithm) as e:
        raise CertificateParseError(f"malformed certificate: {e}") from None


def chain_pem(certs: Iterable[Certificate]) -> bytes:
    return b"".join(c.pem for c in certs)


@dataclass(frozen=True, slots=True, repr=False)
class Credential:
    """A certificate with its private key and the rest of its chain (issuer first, no anchor)."""

    certificate: Certificate
    key: PrivateKey
    chain: tuple[Certificate, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.certificate, Certificate):
            raise TypeError("certificate must be a pki.certs.Certificate")
        if not isinstance(self.key, PrivateKey):
            raise TypeError("key must be a pki.keys.PrivateKey")
        if not self.key.matches(self.certificate.x509.public_key()):
            raise KeyLoadError(
                f"the private key does not match the certificate {self.certificate.subject}"
            )

    def __repr__(self) -> str:
        return f"Credential({self.certificate!r}, chain={len(self.chain)})"

    @property
    def full_chain(self) -> tuple[Certificate, ...]:
        return (self.certificate, *self.chain)

    def chain_pem(self) -> bytes:
        return chain_pem(self.full_chain)

    @property
    def expires(self) -> datetime:
        """The earliest NotAfter of the certificate and its chain."""
        return min(c.not_after for c in self.full_chain)


# --- builders -----------------------------------------------------------------------------


def _name(cn: str, org: str | None = "TrustMesh") -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def random_serial() -> int:
    """A random positive 128-bit serial (top bit cleared so DER stays 16 bytes + sign octet)."""
    return secrets.randbits(127) | 1


def _check_time(now: datetime) -> None:
    if not isinstance(now, datetime):
        raise TypeError(f"now must be a datetime, not {type(now).__name__}")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")


def _window(
    now: datetime,
    lifetime: timedelta,
    skew: timedelta,
    parents: Sequence[Certificate],
) -> tuple[datetime, datetime]:
    if lifetime <= timedelta(0):
        raise ValueError(f"lifetime must be positive, got {lifetime}")
    not_before = now - skew
    try:
        not_after = now + lifetime + skew
    except OverflowError:
        raise ValueError(f"lifetime {lifetime} reaches past the year 9999") from None
    for parent in parents:
        not_after = min(not_after, parent.not_after)
    if not_after <= now:
        raise CertificateBuildError(
            f"the issuer chain expires at {min(p.not_after for p in parents).isoformat()}, "
            "so no certificate can be issued"
        )
    return not_before, not_after


def _ca_extensions(
    builder: x509.CertificateBuilder, path_length: int | None
) -> x509.CertificateBuilder:
    return builder.add_extension(
        x509.BasicConstraints(ca=True, path_length=path_length), critical=True
    ).add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )


def _sign(builder: x509.CertificateBuilder, signer: PrivateKey) -> Certificate:
    cert = builder.sign(signer.key, signer.algorithm.signature_hash())
    return Certificate(cert.public_bytes(serialization.Encoding.DER), cert)  # built here: no check


def create_anchor(
    key: PrivateKey,
    *,
    now: datetime,
    lifetime: timedelta = DEFAULT_ANCHOR_LIFETIME,
    common_name: str = "TrustMesh trust anchor",
    skew: timedelta = DEFAULT_CLOCK_SKEW,
    path_length: int | None = 1,
) -> Certificate:
    """A self-signed root CA. ``path_length=1`` allows one issuer level below it."""
    _check_time(now)
    not_before, not_after = _window(now, lifetime, skew, ())
    name = _name(common_name)
    pub = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pub)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
    )
    return _sign(_ca_extensions(builder, path_length), key)


ISSUER_COMMON_NAME = "TrustMesh identity issuer"


def create_issuer(
    key: PrivateKey,
    parent: Credential,
    *,
    now: datetime,
    lifetime: timedelta = DEFAULT_ISSUER_LIFETIME,
    common_name: str = ISSUER_COMMON_NAME,
    skew: timedelta = DEFAULT_CLOCK_SKEW,
) -> Credential:
    """An intermediate CA signed by ``parent`` (an anchor or another issuer), path length 0."""
    cert = issuer_certificate(
        key.public_key(), parent, now=now, lifetime=lifetime, common_name=common_name, skew=skew
    )
    chain = parent.full_chain if not parent.certificate.is_self_signed else parent.chain
    return Credential(cert, key, chain)


def issuer_certificate(
    pub: PublicKeyTypes,
    parent: Credential,
    *,
    now: datetime,
    lifetime: timedelta = DEFAULT_ISSUER_LIFETIME,
    common_name: str = ISSUER_COMMON_NAME,
    skew: timedelta = DEFAULT_CLOCK_SKEW,
) -> Certificate:
    """The certificate of :func:`create_issuer` for a public key whose private key is elsewhere
    (an issuer CSR signed by an offline anchor)."""
    _check_time(now)
    parents = parent.full_chain
    if not parent.certificate.is_ca:
        raise CertificateBuildError(f"{parent.certificate.subject} is not a CA certificate")
    if parent.certificate.path_length == 0:
        raise CertificateBuildError(
            f"{parent.certificate.subject} has path length 0 and cannot sign another CA"
        )
    not_before, not_after = _window(now, lifetime, skew, parents)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(parent.certificate.x509.subject)
        .public_key(pub)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                parent.certificate.x509.public_key()  # type: ignore[arg-type]
            ),
            critical=False,
        )
    )
    return _sign(_ca_extensions(builder, 0), parent.key)


_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)
_LEAF_BC = x509.BasicConstraints(ca=False, path_length=None)

# Leaf issuance is the identity service's hot path: the extensions that never change are
# encoded once, the issuer-derived parts (its name, the AKI) once per issuer (pki.leafder).
_LEAF_STATIC_EXTENSIONS: tuple[x509.Extension[x509.ExtensionType], ...] = (
    x509.Extension(ExtensionOID.BASIC_CONSTRAINTS, True, _LEAF_BC),
    x509.Extension(ExtensionOID.KEY_USAGE, True, _LEAF_KEY_USAGE),
    x509.Extension(ExtensionOID.EXTENDED_KEY_USAGE, False, _LEAF_EKU),
)


@lru_cache(maxsize=8)
def _leaf_template(issuer: Certificate, signer: PrivateKey) -> LeafTemplate:
    """What every leaf ``signer`` issues under ``issuer`` shares, encoded once; refuses a
    non-CA (errors are not cached)."""
    if not issuer.is_ca:
        raise CertificateBuildError(f"{issuer.subject} is not a CA certificate")
    aki = x509.Extension(ExtensionOID.AUTHORITY_KEY_IDENTIFIER, False, _issuer_aki(issuer))
    return LeafTemplate.build(signer, issuer.x509.subject, _LEAF_STATIC_EXTENSIONS, aki)


def issue_leaf(
    public_key: object,
    dns_name: str,
    issuer: Credential,
    *,
    now: datetime,
    lifetime: timedelta = DEFAULT_LEAF_LIFETIME,
    skew: timedelta = DEFAULT_CLOCK_SKEW,
    spiffe_id: str | None = None,
    anchor: Certificate | None = None,
) -> Certificate:
    """A workload certificate for ``dns_name`` (CN and the one DNS SAN), server+client auth.

    ``public_key`` is the subject's public key object (from a validated CSR). NotAfter is
    clamped to the issuer chain and to ``anchor``, the trust anchor that chain ends at (an
    issuer's chain usually stops below it, and an issuer from outside, such as cert-manager's,
    may outlive it). ``spiffe_id`` adds a URI SAN when configured. The DER is
    assembled by :mod:`pki.leafder` (the same bytes CertificateBuilder writes, in a third of
    the time).
    """
    _check_time(now)
    template = _leaf_template(issuer.certificate, issuer.key)
    algorithm_of(public_key)
    if not isinstance(dns_name, str):
        raise TypeError(f"leaf DNS name must be a str, not {type(dns_name).__name__}")
    if not dns_name or not dns_name.isascii():
        raise ValueError(f"leaf DNS name must be a non-empty ASCII string, got {dns_name!r}")
    if spiffe_id is not None and not spiffe_id.isascii():
        raise ValueError(f"SPIFFE ID must be ASCII, got {spiffe_id!r}")
    parents = issuer.full_chain if anchor is None else (*issuer.full_chain, anchor)
    not_before, not_after = _window(now, lifetime, skew, parents)
    tbs = template.tbs(
        serial=random_serial(),
        not_before=not_before,
        not_after=not_after,
        dns_name=dns_name,
        spki_der=spki_der(public_key),
        spiffe_id=spiffe_id,
    )
    der = template.sign(tbs)
    return Certificate(der, x509.load_der_x509_certificate(der))  # built here: no check


def _issuer_aki(issuer: Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.x509.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer.x509.public_key()  # type: ignore[arg-type]
        )


def issue_identity(
    identity: Identity,
    key: PrivateKey,
    issuer: Credential,
    *,
    now: datetime,
    lifetime: timedelta = DEFAULT_LEAF_LIFETIME,
    skew: timedelta = DEFAULT_CLOCK_SKEW,
    with_spiffe_id: bool = False,
    anchor: Certificate | None = None,
) -> Credential:
    """Issue a leaf for ``identity`` directly (no CSR): for the control plane's own certificates.
    ``anchor`` clamps NotAfter as in :func:`issue_leaf`."""
    cert = issue_leaf(
        key.public_key(),
        identity.dns_name,
        issuer,
        now=now,
        lifetime=lifetime,
        skew=skew,
        spiffe_id=identity.spiffe_id if with_spiffe_id else None,
        anchor=anchor,
    )
    return Credential(cert, key, issuer.full_chain)


def utcnow() -> datetime:
    """The current time, for boundaries that own the clock (CLI, servers). Libraries take ``now``."""
    return datetime.now(UTC)
