"""Appended module signatures, read as libkmod reads them (libkmod-signature.c, with OpenSSL).

A signed module ends with ``[signer][key id][signature][struct module_signature][magic]``. For the
PKCS#7 form (the only one current kernels accept) the signature is a DER SignedData whose first
SignerInfo gives the signer (issuer commonName), the key id (issuer serial number), the digest
algorithm and the signature bytes. A trailer or DER that libkmod would not accept yields no
signature, exactly as modinfo then prints none; :func:`signature_problem` says why.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Optional, Union

from kvc.kmod import der

SIG_MAGIC = b"~Module signature appended~\n"
_SIG_STRUCT = struct.Struct(">BBBBB3xI")
ALGORITHMS = ("DSA", "RSA")
HASHES = ("md4", "md5", "sha1", "rmd160", "sha256", "sha384", "sha512", "sha224", "sm3")
ID_TYPES = ("PGP", "X509", "PKCS#7")
ID_PKCS7 = 2

_OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
_OID_COMMON_NAME = "2.5.4.3"
# OpenSSL's long names for digest algorithms, which OBJ_obj2txt prints; others print dotted.
_DIGEST_NAMES = {
    "1.2.840.113549.2.4": "md4",
    "1.2.840.113549.2.5": "md5",
    "1.3.14.3.2.26": "sha1",
    "1.3.36.3.2.1": "ripemd160",
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
    "2.16.840.1.101.3.4.2.4": "sha224",
    "2.16.840.1.101.3.4.2.5": "sha512-224",
    "2.16.840.1.101.3.4.2.6": "sha512-256",
    "2.16.840.1.101.3.4.2.7": "sha3-224",
    "2.16.840.1.101.3.4.2.8": "sha3-256",
    "2.16.840.1.101.3.4.2.9": "sha3-384",
    "2.16.840.1.101.3.4.2.10": "sha3-512",
    "2.16.840.1.101.3.4.2.11": "shake128",
    "2.16.840.1.101.3.4.2.12": "shake256",
    "1.2.156.10197.1.401": "sm3",
    "1.2.840.113549.1.1.1": "rsaEncryption",
    "1.2.840.113549.1.1.11": "sha256WithRSAEncryption",
}


@dataclass(frozen=True)
class ModuleSignature:
    id_type: str  # "PGP", "X509" or "PKCS#7"
    signer: str
    key_id: bytes
    hash_algo: str
    signature: bytes
    algorithm: str  # the trailer's public-key algorithm: "DSA" or "RSA" (0 for PKCS#7: "DSA")


class SignatureProblem(ValueError):
    """Why a module's signature trailer or PKCS#7 data was not accepted."""


def read_signature(image: Union[bytes, mmap.mmap], path: str = "") -> Optional[ModuleSignature]:
    """The module's signature, or None when it has none libkmod would accept."""
    try:
        return parse_signature(image)
    except SignatureProblem:
        return None


def signature_problem(image: Union[bytes, mmap.mmap]) -> Optional[str]:
    """Why a trailer that is present was rejected (None when fine or absent)."""
    try:
        parse_signature(image)
    except SignatureProblem as exc:
        return str(exc)
    return None


def parse_signature(image: Union[bytes, mmap.mmap]) -> Optional[ModuleSignature]:
    """Like :func:`read_signature`, but a malformed trailer raises :class:`SignatureProblem`."""
    size = len(image)
    if size < len(SIG_MAGIC) or image[size - len(SIG_MAGIC):size] != SIG_MAGIC:
        return None
    size -= len(SIG_MAGIC)
    if size < _SIG_STRUCT.size:
        raise SignatureProblem("signature trailer is truncated")
    size -= _SIG_STRUCT.size
    algo, hash_id, id_type, signer_len, key_id_len, sig_len = _SIG_STRUCT.unpack(
        image[size:size + _SIG_STRUCT.size])
    if algo >= len(ALGORITHMS) or hash_id >= len(HASHES) or id_type >= len(ID_TYPES):
        raise SignatureProblem(f"unknown signature algorithm {algo}, hash {hash_id} or id type {id_type}")
    if sig_len == 0 or size < sig_len + signer_len + key_id_len:
        raise SignatureProblem(f"signature length {sig_len} does not fit the file")
    sig_start = size - sig_len
    if id_type == ID_PKCS7:
        return _pkcs7(bytes(image[sig_start:size]), ALGORITHMS[algo])
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


# Modules of one kernel are signed by one key: their SignedData differ only in the signature
# bytes at the very end. Parsed layouts are kept by (total length, bytes before the signature),
# so the common case costs one prefix comparison instead of a DER walk.
_LAYOUTS: dict[int, list[tuple[bytes, ModuleSignature]]] = {}
_MAX_LAYOUTS = 64


def _pkcs7(data: bytes, algorithm: str) -> ModuleSignature:
    for prefix, known in _LAYOUTS.get(len(data), ()):
        if data.startswith(prefix) and known.algorithm == algorithm:
            return ModuleSignature(known.id_type, known.signer, known.key_id, known.hash_algo,
                                   data[len(prefix):], algorithm)
    try:
        parsed, signature_start = _parse_pkcs7(data, algorithm)
    except (der.DerError, IndexError) as exc:
        raise SignatureProblem(f"PKCS#7 signature is malformed: {exc}") from None
    if signature_start + len(parsed.signature) == len(data) and len(_LAYOUTS) < _MAX_LAYOUTS:
        _LAYOUTS.setdefault(len(data), []).append((data[:signature_start], parsed))
    return parsed


def _parse_pkcs7(data: bytes, algorithm: str) -> tuple[ModuleSignature, int]:
    """The signature and the offset where its signature bytes start."""
    top = der.expect(der.read_element(data, 0, len(data)), der.TAG_SEQUENCE)
    content_info = der.children(data, top)
    content_type = der.expect(content_info[0], der.TAG_OID)
    if der.oid_text(data, content_type) != _OID_SIGNED_DATA:
        raise der.DerError("not a SignedData message")
    explicit = der.expect(content_info[1], 0, der.CLASS_CONTEXT)
    signed_data = der.expect(der.children(data, explicit)[0], der.TAG_SEQUENCE)
    fields = der.children(data, signed_data)
    signer_infos = der.expect(fields[-1], der.TAG_SET)
    first = der.expect(der.children(data, signer_infos)[0], der.TAG_SEQUENCE)
    info = der.children(data, first)
    issuer_and_serial = der.children(data, der.expect(info[1], der.TAG_SEQUENCE))
    issuer = der.expect(issuer_and_serial[0], der.TAG_SEQUENCE)
    serial = der.expect(issuer_and_serial[1], der.TAG_INTEGER)
    digest_algorithm = der.children(data, der.expect(info[2], der.TAG_SEQUENCE))
    digest_oid = der.oid_text(data, der.expect(digest_algorithm[0], der.TAG_OID))
    position = 3
    if info[position].cls == der.CLASS_CONTEXT and info[position].tag == 0:
        position += 1  # authenticated attributes
    der.expect(info[position], der.TAG_SEQUENCE)  # digest encryption algorithm
    encrypted = der.expect(info[position + 1], der.TAG_OCTET_STRING)
    if position + 2 < len(info):
        der.expect(info[position + 2], 1, der.CLASS_CONTEXT)  # unauthenticated attributes
    return ModuleSignature(
        id_type=ID_TYPES[ID_PKCS7],
        signer=_common_name(data, issuer),
        key_id=_serial_bytes(data[serial.start:serial.end]),
        hash_algo=_DIGEST_NAMES.get(digest_oid, digest_oid),
        signature=data[encrypted.start:encrypted.end],
        algorithm=algorithm,
    ), encrypted.start


def _common_name(data: bytes, name: der.Element) -> str:
    """The issuer's commonName as libkmod finds it: the first CN entry, or — a quirk of its
    loop — the last entry of the name when there is no CN."""
    value = None
    for rdn in der.children(data, name):
        for attribute in der.children(data, der.expect(rdn, der.TAG_SET)):
            parts = der.children(data, der.expect(attribute, der.TAG_SEQUENCE))
            oid = der.oid_text(data, der.expect(parts[0], der.TAG_OID))
            value = parts[1]
            if oid == _OID_COMMON_NAME:
                return _c_string(data[value.start:value.end])
    return "" if value is None else _c_string(data[value.start:value.end])


def _serial_bytes(content: bytes) -> bytes:
    """The serial number's magnitude as BN_bn2bin writes it: big-endian, no leading zeros."""
    if not content:
        raise der.DerError("empty INTEGER")
    value = int.from_bytes(content, "big", signed=True)
    magnitude = abs(value)
    return magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "big")
