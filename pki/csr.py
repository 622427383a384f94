"""Certificate signing requests: creation (the proxy's side) and validation (the CA's side).

Validation is stricter than Linkerd's: the CSR's self-signature is checked, the key algorithm
must be allowed, and the CSR must carry exactly one DNS SAN (equal to the requested identity)
and no other SAN. Each refusal is its own :class:`~pki.errors.CSRError` subclass.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm as CryptoUnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from pki.errors import (
    CSRIdentityMismatch,
    CSRKeyNotAllowed,
    CSRMalformed,
    CSRSignatureInvalid,
    CSRSubjectAltNameError,
    CSRTooLarge,
    UnsupportedAlgorithm,
    quoted,
)
from pki.keys import KeyAlgorithm, PrivateKey, PublicKeyTypes, algorithm_of

# The ECDSA signature algorithms a CSR may declare, with the hash each one names.
_ECDSA_SIGNATURES: dict[x509.ObjectIdentifier, hashes.HashAlgorithm] = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: hashes.SHA256(),
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: hashes.SHA384(),
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: hashes.SHA512(),
}

# An ML-DSA-65 CSR is ~5.5 KB; anything near this limit is not a CSR we would sign.
DEFAULT_MAX_CSR_BYTES = 16 * 1024


def create_csr(dns_name: str, key: PrivateKey, *, spiffe_id: str | None = None) -> bytes:
    """A DER CSR with CN = ``dns_name`` and exactly one DNS SAN (Linkerd's ``csr.der``)."""
    sans: list[x509.GeneralName] = [x509.DNSName(dns_name)]
    if spiffe_id:
        sans.append(x509.UniformResourceIdentifier(spiffe_id))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [x509.NameAttribute(NameOID.COMMON_NAME, dns_name)] if len(dns_name) <= 64 else []
            )
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key.key, key.algorithm.signature_hash())
    )
    return csr.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True, slots=True)
class ValidatedCSR:
    """A CSR that passed validation: the identity it names and the public key to certify."""

    dns_name: str
    public_key: PublicKeyTypes
    algorithm: KeyAlgorithm


def parse_csr(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_CSR_BYTES
) -> x509.CertificateSigningRequest:
    """Parse DER or PEM bytes into a CSR, refusing oversized input before parsing."""
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"CSR must be bytes, not {type(data).__name__}")
    if len(data) > max_bytes:
        raise CSRTooLarge(f"CSR is {len(data)} bytes, over the limit of {max_bytes} bytes")
    if not data:
        raise CSRMalformed("CSR is empty")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(bytes(data))
        return x509.load_der_x509_csr(bytes(data))
    except (ValueError, x509.InvalidVersion) as e:  # InvalidVersion is not a ValueError
        raise CSRMalformed(f"CSR is not a valid PKCS#10 request: {e}") from None


def validate_csr(
    data: bytes | x509.CertificateSigningRequest,
    *,
    expected_name: str | None = None,
    allowed_algorithms: Collection[KeyAlgorithm] = (KeyAlgorithm.ECDSA_P256,),
    max_bytes: int = DEFAULT_MAX_CSR_BYTES,
) -> ValidatedCSR:
    """Check a CSR and return what may be certified; raise a :class:`CSRError` subclass if not."""
    csr = (
        data
        if isinstance(data, x509.CertificateSigningRequest)
        else parse_csr(data, max_bytes=max_bytes)
    )
    public_key, algorithm = _proven_key(csr, allowed_algorithms)
    dns_name = _single_dns_san(csr)
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns and cns[0].value != dns_name:
        raise CSRIdentityMismatch(
            f"CSR subject CN {quoted(cns[0].value)} differs from its DNS SAN {quoted(dns_name)}"
        )
    if expected_name is not None and dns_name != expected_name:
        raise CSRIdentityMismatch(
            f"CSR names {quoted(dns_name)}, but the requested identity is {quoted(expected_name)}"
        )
    return ValidatedCSR(dns_name, public_key, algorithm)


def _check_signature(csr: x509.CertificateSigningRequest, public_key: object) -> None:
    """The CSR's self-signature. ECDSA is checked with the key already loaded (a second load
    inside ``is_signature_valid`` costs ~15 µs per request on the identity hot path)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        digest = _ECDSA_SIGNATURES.get(csr.signature_algorithm_oid)
        if digest is None:
            raise CSRSignatureInvalid(
                f"CSR is signed with {csr.signature_algorithm_oid.dotted_string}; "
                "an ECDSA key must sign with SHA-256, SHA-384 or SHA-512"
            )
        try:
            public_key.verify(csr.signature, csr.tbs_certrequest_bytes, ec.ECDSA(digest))
            return
        except Exception:  # InvalidSignature, and malformed encodings raise too
            pass
    else:
        try:
            if csr.is_signature_valid:
                return
        except Exception:  # malformed signature encodings raise instead of returning False
            pass
    raise CSRSignatureInvalid("CSR signature does not verify with the CSR's own public key")


def _single_dns_san(csr: x509.CertificateSigningRequest) -> str:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CSRSubjectAltNameError(
            "CSR has no subjectAltName; exactly one DNS name is required"
        ) from None
    except ValueError as e:
        raise CSRMalformed(f"CSR extensions cannot be parsed: {e}") from None
    names = list(san)
    dns = [n.value for n in names if isinstance(n, x509.DNSName)]
    others = [type(n).__name__ for n in names if not isinstance(n, x509.DNSName)]
    if others:
        raise CSRSubjectAltNameError(
            f"CSR carries {', '.join(sorted(set(others)))} SANs; only one DNS name is allowed"
        )
    if len(dns) != 1:
        raise CSRSubjectAltNameError(f"CSR carries {len(dns)} DNS SANs; exactly one is required")
    return str(dns[0])


def create_ca_csr(key: PrivateKey, common_name: str) -> bytes:
    """A PEM CSR for an issuer (intermediate CA) key: subject CN only, no extensions; the
    signer applies the issuer profile (CA, path length 0, key usages) whatever a CSR asks."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key.key, key.algorithm.signature_hash())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def validate_ca_csr(
    data: bytes,
    *,
    allowed_algorithms: Collection[KeyAlgorithm] = tuple(KeyAlgorithm),
    max_bytes: int = DEFAULT_MAX_CSR_BYTES,
) -> tuple[PublicKeyTypes, str | None]:
    """The public key an issuer CSR asks to certify, and its subject CN (None without one),
    once its self-signature proves the requester holds the key; a :class:`CSRError` if not."""
    csr = parse_csr(data, max_bytes=max_bytes)
    public_key, _ = _proven_key(csr, allowed_algorithms)
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return public_key, (str(cns[0].value) if cns else None)


def _proven_key(
    csr: x509.CertificateSigningRequest, allowed_algorithms: Collection[KeyAlgorithm]
) -> tuple[PublicKeyTypes, KeyAlgorithm]:
    """The CSR's public key, of an allowed algorithm, once its self-signature verifies."""
    try:
        public_key = csr.public_key()
        algorithm = algorithm_of(public_key)
    except (UnsupportedAlgorithm, CryptoUnsupportedAlgorithm) as e:
        # cryptography raises its own UnsupportedAlgorithm (not a ValueError) for unknown curves
        raise CSRKeyNotAllowed(f"CSR key is not allowed: {e}") from None
    except ValueError as e:
        raise CSRMalformed(f"CSR public key cannot be read: {e}") from None
    if algorithm not in allowed_algorithms:
        allowed = ", ".join(a.value for a in allowed_algorithms)
        raise CSRKeyNotAllowed(
            f"CSR key algorithm {algorithm.value} is not allowed (allowed: {allowed})"
        )
    _check_signature(csr, public_key)
    return public_key, algorithm  # type: ignore[return-value]
