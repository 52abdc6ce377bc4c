"""Append a kernel module signature, byte for byte as the kernel's ``scripts/sign-file`` does.

The signature is a DER PKCS#7 (CMS) SignedData over the module's bytes, detached, with no signed
attributes and no certificates; its one SignerInfo names the signer by the certificate's issuer
and serial number (sign-file's default) or by its subject key identifier (sign-file ``-k``). Then
come ``struct module_signature`` (algo 0, hash 0, id_type 2 = PKCS#7, the PKCS#7's length) and
the magic. RSA PKCS#1 v1.5 signatures are deterministic, so the output equals sign-file's.

Like sign-file, :func:`sign_module` appends to whatever it is given, a module that already
carries a signature included (the kernel checks only the last one).

Signing needs only a :class:`Signer`: the certificate and a function that signs bytes. The
certificate is read here with a small DER reader; :class:`KeyFileSigner` signs with a private key
file through the ``cryptography`` package, imported only when a key file is used.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, List, NamedTuple, Optional, Protocol, Tuple, Union

from kvc.kmod import compression
from kvc.kmod.atomic import write_file
from kvc.kmod.der import oid_text
from kvc.kmod.errors import KmodError
from kvc.kmod.signature import ID_PKCS7, SIG_MAGIC, encode_oid

_SIG_STRUCT = struct.Struct(">BBBBB3xI")

# The digests the kernel's module signature check accepts (crypto/asymmetric_keys), by OID.
DIGEST_OIDS = {
    "sha224": "2.16.840.1.101.3.4.2.4",
    "sha256": "2.16.840.1.101.3.4.2.1",
    "sha384": "2.16.840.1.101.3.4.2.2",
    "sha512": "2.16.840.1.101.3.4.2.3",
}
_OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
_OID_DATA = "1.2.840.113549.1.7.1"
_OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
_OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
_OID_SUBJECT_KEY_ID = "2.5.29.14"

_TAG_INTEGER = 0x02
_TAG_OCTET_STRING = 0x04
_TAG_NULL = 0x05
_TAG_OID = 0x06
_TAG_SEQUENCE = 0x30
_TAG_SET = 0x31


class SigningError(KmodError):
    """A module cannot be signed as asked (unknown hash, unusable key or certificate)."""


class Signer(Protocol):
    """Who signs: the X.509 certificate (DER) and a raw RSA PKCS#1 v1.5 signature of ``data``."""

    @property
    def certificate_der(self) -> bytes: ...

    def sign(self, data: bytes, hash_name: str) -> bytes: ...


# --- DER -----------------------------------------------------------------------------------


def _tlv(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    size = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _oid(dotted: str) -> bytes:
    return _tlv(_TAG_OID, encode_oid(dotted))


def _integer(value: int) -> bytes:
    return _tlv(_TAG_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=False))


def _set_of(*elements: bytes) -> bytes:
    # DER orders a SET OF by its encodings; every set written here has one element.
    return _tlv(_TAG_SET, b"".join(sorted(elements)))


class _Element(NamedTuple):
    tag: int
    content: bytes
    encoded: bytes  # the whole TLV


def _elements(data: bytes, where: str) -> List[_Element]:
    """The DER elements one after another in ``data`` (definite lengths only, as DER has)."""
    out = []
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise SigningError(f"{where}: truncated DER")
        tag = data[pos]
        first = data[pos + 1]
        head = 2
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count == 0 or count > 4 or pos + 2 + count > len(data):
                raise SigningError(f"{where}: bad DER length")
            length = int.from_bytes(data[pos + 2 : pos + 2 + count], "big")
            head += count
        end = pos + head + length
        if end > len(data):
            raise SigningError(f"{where}: truncated DER")
        out.append(_Element(tag, data[pos + head : end], data[pos:end]))
        pos = end
    return out


class Certificate(NamedTuple):
    """What the signature needs of an X.509 certificate."""

    issuer: bytes  # the issuer Name, DER as in the certificate
    serial: bytes  # the serialNumber INTEGER, DER as in the certificate (copied, as OpenSSL does)
    key_algorithm: str  # OID of the subject public key's algorithm
    subject_key_id: Optional[bytes]


def read_certificate(der_bytes: bytes) -> Certificate:
    """Issuer, serial number, key algorithm and subject key identifier of a DER certificate."""
    where = "certificate"
    try:
        (cert,) = _elements(der_bytes, where)
        tbs = _elements(cert.content, where)[0]
        fields = _elements(tbs.content, where)
        if fields[0].tag == 0xA0:  # [0] version
            fields = fields[1:]
        serial, _algorithm, issuer, _validity, _subject, spki = fields[:6]
        key_algorithm = _elements(_elements(spki.content, where)[0].content, where)[0]
        skid = None
        for extra in fields[6:]:
            if extra.tag != 0xA3:  # [3] extensions
                continue
            for extension in _elements(_elements(extra.content, where)[0].content, where):
                parts = _elements(extension.content, where)
                if parts[0].encoded == _oid(_OID_SUBJECT_KEY_ID):
                    skid = _elements(parts[-1].content, where)[0].content
    except (ValueError, IndexError):
        raise SigningError(
            "the signing certificate is not a DER X.509 certificate",
            hint="give the certificate as PEM or DER (openssl x509 -outform DER)",
        ) from None
    if cert.tag != _TAG_SEQUENCE or serial.tag != _TAG_INTEGER or key_algorithm.tag != _TAG_OID:
        raise SigningError("the signing certificate is not a DER X.509 certificate")
    return Certificate(
        issuer=issuer.encoded,
        serial=serial.encoded,
        key_algorithm=oid_text(key_algorithm.content),
        subject_key_id=skid,
    )


def certificate_from_pem_or_der(data: bytes) -> bytes:
    """The DER bytes of a certificate given as PEM or DER."""
    marker = b"-----BEGIN CERTIFICATE-----"
    if marker not in data:
        return data
    import base64
    import binascii

    body = data.split(marker, 1)[1].split(b"-----END CERTIFICATE-----", 1)[0]
    try:
        return base64.b64decode(b"".join(body.split()), validate=True)
    except binascii.Error:
        raise SigningError("the signing certificate's PEM is corrupt") from None


# --- the signature -------------------------------------------------------------------------


def check_hash(hash_name: str) -> str:
    if hash_name not in DIGEST_OIDS:
        raise SigningError(
            f"unsupported signature hash '{hash_name}'",
            hint=f"use one of: {', '.join(DIGEST_OIDS)}",
        )
    return hash_name


def pkcs7(signature: bytes, certificate: Certificate, hash_name: str, *, key_id_from_skid: bool = False) -> bytes:
    """The DER PKCS#7 SignedData sign-file writes around a raw RSA signature."""
    if certificate.key_algorithm != _OID_RSA_ENCRYPTION:
        raise _unsupported_key(certificate.key_algorithm)
    digest = _tlv(_TAG_SEQUENCE, _oid(DIGEST_OIDS[check_hash(hash_name)]))
    if key_id_from_skid:
        if certificate.subject_key_id is None:
            raise SigningError(
                "the signing certificate has no subject key identifier (needed for -k)",
                hint="sign without -k, or use a certificate with the subjectKeyIdentifier extension",
            )
        version = 3
        signer_id = _tlv(0x80, certificate.subject_key_id)  # [0] IMPLICIT SubjectKeyIdentifier
    else:
        version = 1
        signer_id = _tlv(_TAG_SEQUENCE, certificate.issuer + certificate.serial)
    signer_info = _tlv(
        _TAG_SEQUENCE,
        _integer(version)
        + signer_id
        + digest
        + _tlv(_TAG_SEQUENCE, _oid(_OID_RSA_ENCRYPTION) + _tlv(_TAG_NULL, b""))
        + _tlv(_TAG_OCTET_STRING, signature),
    )
    signed_data = _tlv(
        _TAG_SEQUENCE,
        _integer(version) + _set_of(digest) + _tlv(_TAG_SEQUENCE, _oid(_OID_DATA)) + _set_of(signer_info),
    )
    return _tlv(_TAG_SEQUENCE, _oid(_OID_SIGNED_DATA) + _tlv(0xA0, signed_data))


def _unsupported_key(algorithm: str) -> SigningError:
    if algorithm == _OID_EC_PUBLIC_KEY:
        return SigningError(
            "ECDSA module signing keys are not supported",
            details="Debian's 6.1 kernels are built with '# CONFIG_CRYPTO_ECDSA is not set' and cannot verify them",
            hint="use an RSA key (2048 to 4096 bits)",
        )
    return SigningError(f"unsupported signing key algorithm {algorithm}", hint="use an RSA key (2048 to 4096 bits)")


def signature_block(module_bytes: bytes, signer: Signer, hash_name: str, *, key_id_from_skid: bool = False) -> bytes:
    """PKCS#7 + ``struct module_signature`` + magic: what sign-file appends to ``module_bytes``."""
    certificate = read_certificate(signer.certificate_der)
    if certificate.key_algorithm != _OID_RSA_ENCRYPTION:
        raise _unsupported_key(certificate.key_algorithm)
    message = pkcs7(
        signer.sign(module_bytes, check_hash(hash_name)), certificate, hash_name, key_id_from_skid=key_id_from_skid
    )
    return pkcs7_trailer(message)


def pkcs7_trailer(message: bytes) -> bytes:
    """A DER PKCS#7 made elsewhere (sign-file -s) followed by ``struct module_signature`` and the magic."""
    return message + _SIG_STRUCT.pack(0, 0, ID_PKCS7, 0, 0, len(message)) + SIG_MAGIC


def sign_module(module_bytes: bytes, signer: Signer, hash_name: str, *, key_id_from_skid: bool = False) -> bytes:
    """The module with its signature appended (appended as sign-file does, even to a signed module)."""
    return module_bytes + signature_block(module_bytes, signer, hash_name, key_id_from_skid=key_id_from_skid)


def sign_module_file(
    path: Union[str, Path],
    signer: Signer,
    hash_name: str,
    *,
    dest: Union[str, Path, None] = None,
    key_id_from_skid: bool = False,
) -> Path:
    """Sign a module file into ``dest`` (default: in place, atomically); returns the path written.

    A compressed module (``.ko.xz``, ``.ko.zst``, ``.ko.gz``) is decompressed, its uncompressed
    bytes signed, and the result compressed again the same way, as the kernel's build signs before
    it compresses.
    """
    source = Path(path)
    target = Path(dest) if dest is not None else source
    data = source.read_bytes()
    kind, plain = compression.decompress(data, str(source))
    signed = sign_module(bytes(plain), signer, hash_name, key_id_from_skid=key_id_from_skid)
    if kind is not None:
        signed = compression.compress(kind, signed, str(target))
    mode = os.stat(source).st_mode & 0o7777
    write_file(str(target), signed, mode)
    return target


# --- a key file ----------------------------------------------------------------------------


def _cryptography() -> Tuple[Any, Any, Any]:
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding
    except ImportError:
        raise SigningError(
            "signing with a key file needs the Python package 'cryptography', which is not installed",
            hint="install it: pip install 'kvc[sign]' (Debian/Ubuntu: apt install python3-cryptography; "
            "Fedora/RHEL: dnf install python3-cryptography)",
        ) from None
    return hashes, serialization, padding


class KeyFileSigner:
    """Signs with an RSA private key file (PEM or DER, unencrypted) and its certificate (PEM or DER)."""

    def __init__(self, key_path: Union[str, Path], certificate_path: Union[str, Path]) -> None:
        hashes, serialization, padding = _cryptography()
        self._hashes = hashes
        self._padding = padding
        self.certificate_der = certificate_from_pem_or_der(Path(certificate_path).read_bytes())
        key_bytes = Path(key_path).read_bytes()
        loader = (
            serialization.load_pem_private_key if b"-----BEGIN" in key_bytes else serialization.load_der_private_key
        )
        try:
            self._key = loader(key_bytes, password=None)
        except (ValueError, TypeError) as exc:
            raise SigningError(
                f"{key_path}: cannot read the private key ({exc})",
                hint="give an unencrypted RSA private key, PEM or DER",
            ) from None
        from cryptography.hazmat.primitives.asymmetric import rsa

        if not isinstance(self._key, rsa.RSAPrivateKey):
            algorithm = read_certificate(self.certificate_der).key_algorithm
            raise _unsupported_key(_OID_EC_PUBLIC_KEY if "EllipticCurve" in type(self._key).__name__ else algorithm)

    def sign(self, data: bytes, hash_name: str) -> bytes:
        digest = getattr(self._hashes, check_hash(hash_name).upper())()
        signature: bytes = self._key.sign(data, self._padding.PKCS1v15(), digest)
        return signature
