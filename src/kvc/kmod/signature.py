"""Appended module signatures, read as Debian's kmod 30 (libkmod built with OpenSSL) reads them.

A signed module ends with ``[signer][key id][signature][struct module_signature][magic]``
(``libkmod/libkmod-signature.c``). The 12-byte struct is ``u8 algo, hash, id_type, signer_len,
key_id_len, pad[3]; be32 sig_len``.

* Legacy trailers (id_type 0 "PGP", 1 "X509") carry the signer, key id and signature raw; the
  hash name comes from the trailer's ``hash`` byte.
* PKCS#7 trailers (id_type 2, what current kernels write) hold a DER SignedData in the
  ``sig_len`` bytes. libkmod decodes it with ``d2i_PKCS7_bio`` and takes the first SignerInfo:
  signer = the issuer's first commonName (or, a quirk of its loop, the issuer's last entry when
  there is no commonName), key id = the serial number's magnitude without leading zeros
  (``ASN1_INTEGER_to_BN`` + ``BN_bn2bin``), hash = kmod 30's name for the digest OID (md4 md5
  sha1 rmd160 sha256 sha384 sha512 sha224 sm3), signature = the encryptedDigest.
  :mod:`kvc.kmod.der` accepts and rejects the same encodings OpenSSL 3.0 does.

When libkmod rejects a trailer — bad algo/hash/id_type byte, ``sig_len`` 0 or larger than the
file, a PKCS#7 OpenSSL cannot decode, a message that is not SignedData, no SignerInfo, or a
digest algorithm kmod 30 has no name for — ``kmod_module_signature_info`` fails and modinfo
prints no signature fields at all. :func:`read_signature` returns None then, like for an
unsigned module; :func:`parse_signature` raises :class:`SignatureProblem` saying why, and
:func:`signature_problem` returns that reason as text.
"""

from __future__ import annotations

import mmap
import struct
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Tuple, TypeVar, Union

from kvc.kmod.errors import ModuleFormatError

if TYPE_CHECKING:
    from kvc.kmod import der

SIG_MAGIC = b"~Module signature appended~\n"
_SIG_STRUCT = struct.Struct(">BBBBB3xI")
ALGORITHMS = ("DSA", "RSA")
HASHES = ("md4", "md5", "sha1", "rmd160", "sha256", "sha384", "sha512", "sha224", "sm3")
ID_TYPES = ("PGP", "X509", "PKCS#7")
ID_PKCS7 = 2

Image = Union[bytes, mmap.mmap]


def encode_oid(dotted: str) -> bytes:
    """The DER content octets of an OBJECT IDENTIFIER."""
    arcs = [int(arc) for arc in dotted.split(".")]
    out = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


# kmod 30's obj_to_hash_algo(): the digest NIDs it knows, named from its pkey_hash_algo table.
# Any other digest algorithm makes libkmod drop the whole signature (checked against Debian's
# kmod 30+20221128: e.g. sha3-256 gives no signature fields; later kmod prints OBJ_obj2txt).
_DIGEST_NAMES: Dict[bytes, str] = {
    encode_oid("1.2.840.113549.2.4"): "md4",
    encode_oid("1.2.840.113549.2.5"): "md5",
    encode_oid("1.3.14.3.2.26"): "sha1",
    encode_oid("1.3.36.3.2.1"): "rmd160",
    encode_oid("2.16.840.1.101.3.4.2.1"): "sha256",
    encode_oid("2.16.840.1.101.3.4.2.2"): "sha384",
    encode_oid("2.16.840.1.101.3.4.2.3"): "sha512",
    encode_oid("2.16.840.1.101.3.4.2.4"): "sha224",
    encode_oid("1.2.156.10197.1.401"): "sm3",
}
_OID_COMMON_NAME = encode_oid("2.5.4.3")


class ModuleSignature(NamedTuple):
    """What modinfo shows of a signature (the ``sig_*`` names are modinfo's field names)."""

    id_type: str  # sig_id: "PGP", "X509" or "PKCS#7"
    signer: str  # signer, as printf("%s") shows it: up to the first NUL, undecodable bytes escaped
    key_id: bytes  # sig_key (modinfo prints it as XX:XX:… hex)
    hash_algo: str  # sig_hashalgo
    signature: bytes  # signature
    algorithm: Optional[str] = None  # legacy trailers only: "DSA" or "RSA" (libkmod sets none for PKCS#7)

    @property
    def sig_id(self) -> str:
        return self.id_type

    @property
    def sig_key(self) -> bytes:
        return self.key_id

    @property
    def sig_hashalgo(self) -> str:
        return self.hash_algo


class SignatureProblem(ModuleFormatError):
    """A module has a signature trailer that libkmod does not accept (so it shows none)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path or "<module>", problem)


def read_signature(image: Image, path: str = "") -> Optional[ModuleSignature]:
    """The signature libkmod reads from a decompressed module image, or None when the image has
    no trailer or one libkmod rejects. Never raises for any content of ``image``."""
    try:
        return parse_signature(image, path)
    except SignatureProblem:
        return None


def signature_problem(image: Image, path: str = "") -> Optional[str]:
    """Why a signature trailer that is present was rejected; None when it is fine or absent."""
    try:
        parse_signature(image, path)
    except SignatureProblem as exc:
        return exc.problem
    return None


def parse_signature(image: Image, path: str = "") -> Optional[ModuleSignature]:
    """Like :func:`read_signature`, but a trailer libkmod rejects raises :class:`SignatureProblem`
    (a :class:`~kvc.kmod.errors.ModuleFormatError`) instead of giving None. An image without the
    magic string is simply unsigned: None."""
    size = len(image)
    if size < len(SIG_MAGIC) or image[size - len(SIG_MAGIC) : size] != SIG_MAGIC:
        return None
    size -= len(SIG_MAGIC)
    if size < _SIG_STRUCT.size:
        raise SignatureProblem(path, f"signature trailer is truncated: {size} bytes before the magic string")
    size -= _SIG_STRUCT.size
    algo, hash_id, id_type, signer_len, key_id_len, sig_len = _SIG_STRUCT.unpack(image[size : size + _SIG_STRUCT.size])
    if algo >= len(ALGORITHMS) or hash_id >= len(HASHES) or id_type >= len(ID_TYPES):
        raise SignatureProblem(
            path, f"signature trailer has unknown algorithm {algo}, hash {hash_id} or key id type {id_type}"
        )
    if sig_len == 0:
        raise SignatureProblem(path, "signature trailer has a zero signature length")
    if size < sig_len + signer_len + key_id_len:
        raise SignatureProblem(
            path, f"signature trailer claims {sig_len + signer_len + key_id_len} bytes but only {size} precede it"
        )
    sig_start = size - sig_len
    if id_type == ID_PKCS7:
        return _pkcs7(image, sig_start, size, path)
    key_start = sig_start - key_id_len
    signer_start = key_start - signer_len
    return ModuleSignature(
        id_type=ID_TYPES[id_type],
        signer=_c_string(bytes(image[signer_start:key_start])),
        key_id=bytes(image[key_start:sig_start]),
        hash_algo=HASHES[hash_id],
        signature=bytes(image[sig_start:size]),
        algorithm=ALGORITHMS[algo],
    )


def _c_string(raw: bytes) -> str:
    """What printf("%s") shows of a byte string: everything before the first NUL."""
    end = raw.find(b"\0")
    return (raw if end < 0 else raw[:end]).decode("utf-8", "surrogateescape")


# The modules of one kernel are signed by one key, so their SignedData differ only in the
# signature bytes at the very end. Each decoded layout is kept as (bytes before the signature,
# result) under its total length: the common case costs one comparison instead of a DER walk.
# Only layouts whose encryptedDigest is a primitive OCTET STRING ending the data are kept; for
# those, every other byte is before it, so equal prefixes decode identically.
_LAYOUTS: Dict[int, List[Tuple[bytes, ModuleSignature]]] = {}
_MAX_LAYOUTS = 64


def _pkcs7(image: Image, start: int, end: int, path: str) -> ModuleSignature:
    length = end - start
    for prefix, known in _LAYOUTS.get(length, ()):
        if image[start : start + len(prefix)] == prefix:
            return ModuleSignature(
                known.id_type, known.signer, known.key_id, known.hash_algo, bytes(image[start + len(prefix) : end])
            )
    data = bytes(image[start:end])
    # Imported here: reading a module that is unsigned, or whose signature's layout is known,
    # needs no DER decoder (a start-up cost under emulation: kvc verify's guest agent).
    from kvc.kmod import der

    try:
        parsed, span = _decode_pkcs7(data)
    except der.DerError as exc:
        raise SignatureProblem(path, f"PKCS#7 signature is malformed: {exc}") from None
    except _Rejected as exc:
        raise SignatureProblem(path, str(exc)) from None
    if span is not None and span[1] == length and len(_LAYOUTS) < _MAX_LAYOUTS:
        layouts = _LAYOUTS.setdefault(length, [])
        if len(layouts) < _MAX_LAYOUTS:
            layouts.append((data[: span[0]], parsed))
    return parsed


class _Rejected(Exception):
    """The PKCS#7 decodes, but libkmod's fill_pkcs7() still gives up on it."""


_N = TypeVar("_N", "der.Value", "der.Record", "der.Items", "der.Name")


def _get(record: der.Record, name: str, kind: type[_N]) -> _N:
    from kvc.kmod import der

    node = record.fields.get(name)
    if not isinstance(node, kind):
        raise der.DerError(f"decoded {name} is not a {kind.__name__}", 0)  # pragma: no cover
    return node


def _decode_pkcs7(data: bytes) -> Tuple[ModuleSignature, Optional[Tuple[int, int]]]:
    """fill_pkcs7(): the signature fields, and where the signature bytes lie in ``data`` (None
    when they were assembled from a constructed OCTET STRING). Raises :class:`der.DerError`
    for an encoding OpenSSL rejects and libkmod's own checks (:class:`_Rejected`)."""
    from kvc.kmod import der

    p7 = der.d2i_pkcs7_bio(data)
    content_type = _get(p7, "type", der.Value).data
    content = p7.fields.get("d")
    # PKCS7_get_signer_info(): SignedData and SignedAndEnvelopedData only, and only with content.
    if content_type not in (der.OID_SIGNED, der.OID_SIGNED_AND_ENVELOPED):
        raise _Rejected(f"PKCS#7 message has content type {der.oid_text(content_type)}, not SignedData")
    if not isinstance(content, der.Record):
        raise _Rejected("PKCS#7 SignedData has no content")
    signer_infos = _get(content, "signer_info", der.Items).items
    if not signer_infos or not isinstance(signer_infos[0], der.Record):
        raise _Rejected("PKCS#7 SignedData has no SignerInfo")
    info = signer_infos[0]
    issuer_and_serial = _get(info, "issuer_and_serial", der.Record)
    issuer = _get(issuer_and_serial, "issuer", der.Name)
    serial = _get(issuer_and_serial, "serial", der.Value).data
    digest_oid = _get(_get(info, "digest_alg", der.Record), "algorithm", der.Value).data
    encrypted = _get(info, "enc_digest", der.Value)
    hash_algo = _DIGEST_NAMES.get(digest_oid)
    if hash_algo is None:
        raise _Rejected(f"PKCS#7 digest algorithm {der.oid_text(digest_oid)} is not one kmod 30 knows")
    magnitude = abs(int.from_bytes(serial, "big", signed=True))
    signature = ModuleSignature(
        id_type=ID_TYPES[ID_PKCS7],
        signer=_issuer_text(issuer),
        key_id=magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "big"),
        hash_algo=hash_algo,
        signature=encrypted.data,
    )
    return signature, encrypted.span


def _issuer_text(issuer: der.Name) -> str:
    """x509_name_to_str(): the first commonName entry; with none, the loop ends on the last
    entry and libkmod uses that; with no entries at all, no signer ("")."""
    chosen: Optional[der.Value] = None
    for oid, value in issuer.entries:
        chosen = value
        if oid == _OID_COMMON_NAME:
            break
    if chosen is None:
        return ""
    return chosen.text_bytes().decode("utf-8", "surrogateescape")
