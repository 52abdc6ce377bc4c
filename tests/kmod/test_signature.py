"""Module signatures (kvc.kmod.signature, kvc.kmod.der) against Debian's kmod 30 modinfo.

Real signed Debian modules, and PKCS#7 / legacy trailers crafted here and appended to a real
module whose own trailer was stripped, are given to both; every signature field must match, and
a trailer kmod ignores must give None. Malformed trailers and DER (every truncation, seeded
random mutations) must never raise anything but the documented errors.
"""

from __future__ import annotations

import datetime
import mmap
import random
import struct
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import pytest

from kvc.kmod import der
from kvc.kmod.errors import ModuleFormatError
from kvc.kmod.module import ModuleFile
from kvc.kmod.signature import (
    SIG_MAGIC,
    ModuleSignature,
    SignatureProblem,
    encode_oid,
    parse_signature,
    read_signature,
    signature_problem,
)
from support.debian_kernel import DebianKernel
from support.oracle import kmod_tool

SEED = 20261124
TRAILER = struct.Struct(">BBBBB3xI")


# --- a small DER/BER writer for crafting signatures -----------------------------------------


def length(size: int, form: str = "short") -> bytes:
    if form == "short" and size < 0x80:
        return bytes([size])
    raw = size.to_bytes(max(1, (size.bit_length() + 7) // 8), "big")
    if form == "padded":
        raw = b"\0" + raw
    return bytes([0x80 | len(raw)]) + raw


def tlv(tag: int, *content: bytes, form: str = "short") -> bytes:
    body = b"".join(content)
    if form == "indefinite":
        return bytes([tag]) + b"\x80" + body + b"\0\0"
    return bytes([tag]) + length(len(body), form) + body


def seq(*content: bytes, form: str = "short") -> bytes:
    return tlv(0x30, *content, form=form)


def set_of(*content: bytes, form: str = "short") -> bytes:
    return tlv(0x31, *content, form=form)


def oid(dotted: str) -> bytes:
    return tlv(0x06, encode_oid(dotted))


def integer(content: bytes) -> bytes:
    return tlv(0x02, content)


def octets(content: bytes) -> bytes:
    return tlv(0x04, content)


NULL = b"\x05\x00"
CN = "2.5.4.3"
ORG = "2.5.4.10"
SHA256 = "2.16.840.1.101.3.4.2.1"
RSA = "1.2.840.113549.1.1.1"
DATA = "1.2.840.113549.1.7.1"
SIGNED_DATA = "1.2.840.113549.1.7.2"
SIGNED_AND_ENVELOPED = "1.2.840.113549.1.7.4"


def name(*entries: tuple[str, int, bytes]) -> bytes:
    """An X.509 Name with one attribute per RDN: (OID, string tag, value)."""
    return seq(*[set_of(seq(oid(attr), tlv(tag, value))) for attr, tag, value in entries])


def signer_info(
    *,
    issuer: Optional[bytes] = None,
    serial: bytes = b"\x5a\x17",
    digest: str = SHA256,
    digest_params: Optional[bytes] = NULL,
    signature: Optional[bytes] = None,
    auth: bytes = b"",
    unauth: bytes = b"",
) -> bytes:
    if issuer is None:
        issuer = name((CN, 0x0C, b"Crafted signing key"))
    digest_alg = seq(oid(digest), digest_params) if digest_params is not None else seq(oid(digest))
    return seq(
        integer(b"\x01"),
        seq(issuer, integer(serial)),
        digest_alg,
        auth,
        seq(oid(RSA), NULL),
        signature if signature is not None else octets(bytes(range(64))),
        unauth,
    )


def signed_data(
    *signers: bytes,
    content: Optional[bytes] = None,
    certs: bytes = b"",
    outer_type: str = SIGNED_DATA,
    form: str = "short",
    set_tag: int = 0x31,
) -> bytes:
    body = seq(
        integer(b"\x01"),
        set_of(seq(oid(SHA256), NULL)),
        content or seq(oid(DATA)),
        certs,
        tlv(set_tag, *signers),
        form=form,
    )
    return seq(oid(outer_type), tlv(0xA0, body, form=form), form=form)


def pkcs7_trailer(blob: bytes, *, algo: int = 0, hash_id: int = 0) -> bytes:
    return blob + TRAILER.pack(algo, hash_id, 2, 0, 0, len(blob)) + SIG_MAGIC


def legacy_trailer(
    id_type: int, signer: bytes, key_id: bytes, signature: bytes, *, algo: int = 1, hash_id: int = 2
) -> bytes:
    return (
        signer
        + key_id
        + signature
        + TRAILER.pack(algo, hash_id, id_type, len(signer), len(key_id), len(signature))
        + SIG_MAGIC
    )


# --- the real modules and modinfo --------------------------------------------------------------


def strip_trailer(image: bytes) -> bytes:
    assert image.endswith(SIG_MAGIC)
    _a, _h, _i, signer_len, key_len, sig_len = TRAILER.unpack(image[-40:-28])
    return image[: -40 - sig_len - signer_len - key_len]


@pytest.fixture(scope="module")
def signed_image(kernel_tree: DebianKernel) -> bytes:
    """A small real signed module."""
    path = min(kernel_tree.modules(), key=lambda p: (p.stat().st_size, p.name))
    return bytes(ModuleFile.open(str(path)).image)


@pytest.fixture(scope="module")
def unsigned_image(signed_image: bytes) -> bytes:
    return strip_trailer(signed_image)


def real_pkcs7(signed_image: bytes) -> bytes:
    sig_len = TRAILER.unpack(signed_image[-40:-28])[5]
    return signed_image[-40 - sig_len : -40]


def modinfo_records(paths: Sequence[str]) -> List[Dict[str, bytes]]:
    """modinfo -0 over ``paths``: for each file, its fields (later duplicates overwrite)."""
    out = subprocess.run([kmod_tool("modinfo"), "-0", *paths], capture_output=True).stdout
    records: List[Dict[str, bytes]] = []
    for item in out.split(b"\0"):
        if item.startswith(b"filename:"):
            records.append({})
        elif records and b"=" in item:
            key, _sep, value = item.partition(b"=")
            records[-1][key.decode()] = value
    assert len(records) == len(paths)
    return records


def unhex(text: bytes) -> bytes:
    return bytes.fromhex(text.replace(b":", b"").replace(b"\n", b"").replace(b"\t", b"").decode())


def mismatch(ours: Optional[ModuleSignature], theirs: Dict[str, bytes]) -> Optional[str]:
    """Why our reading of a file differs from modinfo's signature fields (None when it does not)."""
    if ours is None:
        return None if "sig_id" not in theirs else f"modinfo shows a signature: {theirs}"
    if "sig_id" not in theirs:
        return f"modinfo shows no signature, we read {ours}"
    pairs = [
        ("sig_id", ours.sig_id.encode(), theirs["sig_id"]),
        ("signer", ours.signer.encode("utf-8", "surrogateescape"), theirs["signer"]),
        ("sig_key", ours.sig_key, unhex(theirs["sig_key"])),
        ("sig_hashalgo", ours.sig_hashalgo.encode(), theirs["sig_hashalgo"]),
        ("signature", ours.signature, unhex(theirs["signature"])),
    ]
    wrong = [f"{key}: ours {a!r}, modinfo {b!r}" for key, a, b in pairs if a != b]
    return "; ".join(wrong) or None


def compare_with_modinfo(
    images: Sequence[bytes],
    directory: Path,
    labels: Optional[Sequence[str]] = None,
) -> List[str]:
    paths = []
    for index, image in enumerate(images):
        path = directory / f"case{index}.ko"
        path.write_bytes(image)
        paths.append(str(path))
    problems = []
    for start in range(0, len(paths), 500):
        chunk = paths[start : start + 500]
        for offset, theirs in enumerate(modinfo_records(chunk)):
            index = start + offset
            why = mismatch(read_signature(images[index], paths[index]), theirs)
            if why:
                problems.append(f"{labels[index] if labels else index}: {why}")
    return problems


# --- real Debian modules ----------------------------------------------------------------------


@pytest.mark.oracle
def test_real_modules_match_modinfo_field_by_field(kernel_tree: DebianKernel) -> None:
    modules = sorted(random.Random(SEED).sample([str(p) for p in kernel_tree.modules()], 50))
    ours = [read_signature(ModuleFile.open(path).image, path) for path in modules]
    assert all(sig is not None and sig.id_type == "PKCS#7" for sig in ours)
    for field in ("sig_id", "signer", "sig_key", "sig_hashalgo", "signature"):
        out = subprocess.run(
            [kmod_tool("modinfo"), "-0", "-F", field, *modules], capture_output=True, check=True
        ).stdout
        values = out.split(b"\0")[:-1]
        assert len(values) == len(modules)
        for path, sig, value in zip(modules, ours, values):
            assert sig is not None
            expected = {
                "sig_id": sig.sig_id.encode(),
                "signer": sig.signer.encode(),
                "sig_hashalgo": sig.sig_hashalgo.encode(),
            }.get(field)
            if expected is None:
                assert unhex(value) == (sig.sig_key if field == "sig_key" else sig.signature), (path, field)
            else:
                assert value == expected, (path, field)


@pytest.mark.oracle
def test_every_real_module_matches_modinfo(kernel_tree: DebianKernel) -> None:
    modules = [str(p) for p in kernel_tree.modules()]
    assert len(modules) > 3500
    problems = []
    for start in range(0, len(modules), 500):
        chunk = modules[start : start + 500]
        for path, theirs in zip(chunk, modinfo_records(chunk)):
            why = mismatch(read_signature(ModuleFile.open(path).image, path), theirs)
            if why:
                problems.append(f"{path}: {why}")
    assert problems == []


def test_reading_every_signature_of_the_tree_is_fast(kernel_tree: DebianKernel) -> None:
    images = [ModuleFile.open(str(p)).image for p in kernel_tree.modules()]
    signers = {sig.signer for sig in map(read_signature, images) if sig is not None}  # warms the page cache
    assert signers == {"Build time autogenerated kernel key"}
    best = min(_timed(lambda: [read_signature(image) for image in images]) for _ in range(3))
    assert best < 0.1, f"{len(images)} signatures took {best:.3f}s"


def _timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def test_unsigned_module_and_mmap_images(kernel_tree: DebianKernel, unsigned_image: bytes, tmp_path: Path) -> None:
    assert read_signature(unsigned_image) is None
    assert parse_signature(unsigned_image) is None
    assert signature_problem(unsigned_image) is None
    assert read_signature(b"") is None
    assert read_signature(SIG_MAGIC[1:]) is None
    path = tmp_path / "mapped.ko"
    path.write_bytes(unsigned_image + legacy_trailer(1, b"Mapped", b"\x01\x02", b"\x03"))
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        sig = read_signature(mapped, str(path))
    assert sig == ModuleSignature("X509", "Mapped", b"\x01\x02", "sha1", b"\x03", "RSA")


# --- crafted trailers against modinfo ------------------------------------------------------


def _with_cryptography() -> Dict[str, bytes]:
    """PKCS#7 messages made by a real signing library: like sign-file (no certificate, no
    attributes), and with the certificate and authenticated attributes included."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import pkcs7
    from cryptography.x509.oid import NameOID

    def sign(
        label: str,
        key: Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey],
        digest: Union[hashes.SHA256, hashes.SHA384, hashes.SHA512],
        options: List[pkcs7.PKCS7Options],
    ) -> bytes:
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvc tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"kvc {label} key"),
            ]
        )
        start = datetime.datetime(2024, 1, 1)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(0x00F1E2D3C4B5A69788)
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        builder = pkcs7.PKCS7SignatureBuilder().set_data(b"module image").add_signer(cert, key, digest)
        return builder.sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature, *options])

    def rsa_key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    return {
        "rsa-sha256-nocerts": sign(
            "rsa-sha256-nocerts",
            rsa_key(),
            hashes.SHA256(),
            [pkcs7.PKCS7Options.NoCerts, pkcs7.PKCS7Options.NoAttributes],
        ),
        "ec-sha512-cert-attrs": sign(
            "ec-sha512-cert-attrs", ec.generate_private_key(ec.SECP384R1()), hashes.SHA512(), []
        ),
        "rsa-sha384-cert": sign("rsa-sha384-cert", rsa_key(), hashes.SHA384(), [pkcs7.PKCS7Options.NoAttributes]),
    }


def _digest_cases() -> Dict[str, bytes]:
    digests = {
        "md4": "1.2.840.113549.2.4",
        "md5": "1.2.840.113549.2.5",
        "sha1": "1.3.14.3.2.26",
        "rmd160": "1.3.36.3.2.1",
        "sha256": SHA256,
        "sha384": "2.16.840.1.101.3.4.2.2",
        "sha512": "2.16.840.1.101.3.4.2.3",
        "sha224": "2.16.840.1.101.3.4.2.4",
        "sm3": "1.2.156.10197.1.401",
        # kmod 30 knows no name for these and drops the whole signature
        "sha3-256": "2.16.840.1.101.3.4.2.8",
        "sha512-224": "2.16.840.1.101.3.4.2.5",
        "sha256WithRSAEncryption": "1.2.840.113549.1.1.11",
        "unregistered": "1.2.3.4.5.6.7",
    }
    return {f"digest {label}": signed_data(signer_info(digest=dotted)) for label, dotted in digests.items()}


def _issuer_cases() -> Dict[str, bytes]:
    cases = {
        "issuer without entries": name(),
        "issuer without commonName uses its last entry": name((ORG, 0x0C, b"Org"), ("2.5.4.6", 0x13, b"DE")),
        "issuer with an unknown attribute only": name(("1.2.3.4.5", 0x0C, b"Weird")),
        "first commonName wins": name((ORG, 0x0C, b"Org"), (CN, 0x0C, b"First"), (CN, 0x0C, b"Second")),
        "BMPString commonName": name((CN, 0x1E, "Hi".encode("utf-16-be"))),
        "UniversalString commonName": name((CN, 0x1C, "A".encode("utf-32-be"))),
        "commonName with a NUL": name((CN, 0x0C, b"ab\0cd")),
        "T61String with a high byte": name((CN, 0x14, b"caf\xe9")),
        "PrintableString with a high byte": name((CN, 0x13, b"a\xffb")),
        "NumericString commonName": name((CN, 0x12, b"12x")),
        "UTF-8 commonName": name((CN, 0x0C, "Schlüssel".encode())),
        "invalid UTF-8 rejected": name((CN, 0x0C, b"ab\xff")),
        "overlong UTF-8 rejected": name((CN, 0x0C, b"\xc0\x80")),
        "UTF-8 surrogate rejected": name((CN, 0x0C, b"\xed\xa0\x80")),
        "BMPString surrogate rejected": name((CN, 0x1E, b"\xd8\x00")),
        "BMPString of odd length rejected": name((CN, 0x1E, b"\x00\x41\x00")),
        "UniversalString above U+10FFFF rejected": name((CN, 0x1C, b"\x00\x11\x00\x41")),
        "VisibleString is not a name string: rejected": name((CN, 0x1A, b"vis")),
        "OCTET STRING is not a name string: rejected": name((CN, 0x04, b"oct")),
        "ObjectDescriptor value": name((CN, 0x07, b"objdesc")),
        "BIT STRING with bad unused-bits count rejected": name((CN, 0x03, b"\x08AB")),
        "SEQUENCE value prints its encoding": seq(set_of(seq(oid(CN), seq(integer(b"\x01"))))),
        "constructed UTF8String": seq(set_of(seq(oid(CN), tlv(0x2C, tlv(0x0C, b"ab"), tlv(0x04, b"cd"))))),
        "empty RDN set": seq(set_of(), set_of(seq(oid(CN), tlv(0x0C, b"A")))),
        "primitive-form SEQUENCE tag for the name": tlv(0x10, set_of(seq(oid(CN), tlv(0x0C, b"A")))),
        "multi-valued RDN": seq(set_of(seq(oid(ORG), tlv(0x0C, b"O")), seq(oid(CN), tlv(0x0C, b"Multi")))),
    }
    return {label: signed_data(signer_info(issuer=issuer)) for label, issuer in cases.items()}


def _serial_cases() -> Dict[str, bytes]:
    serials = {
        "zero": b"\x00",
        "negative": b"\xff\x01",
        "leading zero byte": b"\x00\x80",
        "minus 256": b"\xff\x00",
        "twenty bytes": bytes(range(1, 21)),
        "non-minimal rejected": b"\x00\x01",
        "non-minimal negative rejected": b"\xff\x80",
        "empty rejected": b"",
    }
    return {f"serial {label}": signed_data(signer_info(serial=serial)) for label, serial in serials.items()}


def _ber_cases() -> Dict[str, bytes]:
    good = signed_data(signer_info())
    info = signer_info()
    sha = seq(oid(SHA256), NULL)
    indefinite = tlv(
        0x30,
        oid(SIGNED_DATA),
        tlv(
            0xA0,
            seq(integer(b"\x01"), tlv(0x31, sha, form="indefinite"), seq(oid(DATA)), set_of(info), form="indefinite"),
            form="indefinite",
        ),
        form="indefinite",
    )
    nested = seq(oid(DATA))
    deep: Dict[int, bytes] = {}
    for level in range(1, 15):
        nested = seq(oid(SIGNED_DATA), tlv(0xA0, seq(integer(b"\x01"), set_of(), nested, set_of())))
        deep[level] = nested
    return {
        "definite DER": good,
        "indefinite lengths": indefinite,
        "padded long-form lengths": signed_data(info, form="padded"),
        # The header limits follow OpenSSL 3.0.22 (Debian's 3.0.22-1~deb12u2, the library kmod 30
        # uses here): headers are read 10 bytes at a time (3.0.19 read 8 and rejected 6 length bytes).
        "top-level length in 5 bytes": reframe(good, 5),
        "top-level length in 8 bytes (10-byte header buffer)": reframe(good, 8),
        "top-level length in 9 bytes rejected (10-byte header buffer)": reframe(good, 9),
        "inner length in 9 bytes under an indefinite top level rejected (10-byte header buffer)": tlv(
            0x30,
            reframe(oid(SIGNED_DATA), 9),
            tlv(0xA0, seq(integer(b"\x01"), set_of(sha), seq(oid(DATA)), set_of(info))),
            form="indefinite",
        ),
        "inner length in 9 bytes under a definite top level (no buffer limit)": seq(
            reframe(oid(SIGNED_DATA), 9), tlv(0xA0, seq(integer(b"\x01"), set_of(sha), seq(oid(DATA)), set_of(info)))
        ),
        "bytes after the message are ignored": good + b"JUNK" * 5,
        "constructed OCTET STRING signature": signed_data(
            signer_info(signature=tlv(0x24, octets(b"\xaa" * 3), tlv(0x24, octets(b"\xbb" * 2), form="indefinite")))
        ),
        "long-form empty OCTET STRING at the end": signed_data(signer_info(signature=b"\x04\x81\x00")),
        "empty signature": signed_data(signer_info(signature=b"\x04\x00")),
        "high-tag-number INTEGER": signed_data(
            seq(
                integer(b"\x01"),
                seq(name((CN, 0x0C, b"K")), b"\x1f\x02\x01\x07"),
                seq(oid(SHA256), NULL),
                seq(oid(RSA), NULL),
                octets(b"\xaa"),
            )
        ),
        "no digest parameters": signed_data(signer_info(digest_params=None)),
        "NULL parameter with content rejected": signed_data(signer_info(digest_params=b"\x05\x01\x00")),
        "BOOLEAN parameter of 2 bytes rejected": signed_data(signer_info(digest_params=tlv(0x01, b"\x01\x02"))),
        "non-minimal INTEGER parameter rejected": signed_data(signer_info(digest_params=tlv(0x02, b"\x00\x01"))),
        "OID parameter with padding rejected": signed_data(signer_info(digest_params=tlv(0x06, b"\x80\x01"))),
        "short UTCTime parameter accepted by OpenSSL 3.0": signed_data(signer_info(digest_params=tlv(0x17, b"123"))),
        "context-specific parameter": signed_data(signer_info(digest_params=tlv(0x85, b"zz"))),
        "authenticated and unauthenticated attributes": signed_data(
            signer_info(
                auth=tlv(0xA0, seq(oid("1.2.840.113549.1.9.3"), set_of(oid(DATA)))),
                unauth=tlv(0xA1, seq(oid("1.2.3"), set_of(NULL))),
            )
        ),
        "attribute value NULL with content rejected": signed_data(
            signer_info(auth=tlv(0xA0, seq(oid("1.2.840.113549.1.9.3"), set_of(b"\x05\x01\x00"))))
        ),
        "data after the last SignerInfo field rejected": signed_data(signer_info(unauth=NULL)),
        "end-of-contents inside a definite SEQUENCE rejected": signed_data(signer_info(unauth=b"\0\0")),
        "no SignerInfo rejected": signed_data(),
        "first of two SignerInfos": signed_data(signer_info(issuer=name((CN, 0x0C, b"first"))), info),
        "primitive-form SET tag for the SignerInfos": signed_data(info, set_tag=0x11),
        "SignedData without content rejected": seq(oid(SIGNED_DATA)),
        "unknown content type rejected": signed_data(info, outer_type="1.2.840.113549.1.7.9"),
        "SignedAndEnvelopedData": _signed_and_enveloped(info),
        "inner DigestedData": signed_data(
            info,
            content=seq(
                oid("1.2.840.113549.1.7.5"), tlv(0xA0, seq(integer(b"\x00"), sha, seq(oid(DATA)), octets(b"digest")))
            ),
        ),
        "inner content of an unknown type with a bad INTEGER rejected": signed_data(
            info, content=seq(oid("1.2.3"), tlv(0xA0, integer(b"\x00\x01")))
        ),
        "bad certificate rejected": signed_data(info, certs=tlv(0xA0, seq(integer(b"\x01")))),
        "bad CRL rejected": signed_data(info, certs=tlv(0xA1, seq(integer(b"\x01")))),
        "13 nested SignedData": signed_data(info, content=deep[13]),
        "14 nested SignedData rejected (nesting limit)": signed_data(info, content=deep[14]),
        "garbage rejected": b"\x30\x03\x02\x01",
        **{
            f"OCTET STRING nested {depth} constructed levels deep{' rejected' if depth > 6 else ''}": signed_data(
                signer_info(signature=nested_string(depth))
            )
            for depth in range(5, 9)
        },
    }


def reframe(element: bytes, length_bytes: int) -> bytes:
    """``element`` with its length rewritten in long form with ``length_bytes`` bytes."""
    header, _too_long = der.get_object(element, 0, len(element))
    size = len(element) - header.content
    return element[:1] + bytes([0x80 | length_bytes]) + size.to_bytes(length_bytes, "big") + element[header.content :]


def nested_string(depth: int) -> bytes:
    """An OCTET STRING in constructed form whose pieces nest ``depth`` levels deep."""
    string = octets(b"x")
    for _ in range(depth):
        string = tlv(0x24, string)
    return string


def _signed_and_enveloped(info: bytes) -> bytes:
    recipient = seq(
        integer(b"\x00"), seq(name((CN, 0x0C, b"Recipient")), integer(b"\x09")), seq(oid(RSA), NULL), octets(b"key")
    )
    encrypted = seq(oid(DATA), seq(oid("2.16.840.1.101.3.4.1.2"), octets(b"iv" * 8)), tlv(0x80, b"ciphertext"))
    body = seq(integer(b"\x01"), set_of(recipient), set_of(seq(oid(SHA256), NULL)), encrypted, set_of(info))
    return seq(oid(SIGNED_AND_ENVELOPED), tlv(0xA0, body))


def _legacy_cases() -> Dict[str, bytes]:
    cases = {}
    for hash_id in range(9):
        cases[f"X509 legacy hash {hash_id}"] = legacy_trailer(
            1, b"Legacy X509 signer", bytes(range(20)), bytes(range(100, 164)), hash_id=hash_id
        )
    cases["PGP legacy, DSA"] = legacy_trailer(
        0, b"PGP signer <pgp@example.org>", b"\x12\x34\x56\x78" * 2, b"\x99" * 40, algo=0, hash_id=4
    )
    cases["legacy signer with a NUL"] = legacy_trailer(1, b"ab\0cd", b"\x01", b"\x02")
    cases["legacy signer with a high byte"] = legacy_trailer(1, b"Schl\xfcssel", b"", b"\x02")
    cases["legacy empty signer and key"] = legacy_trailer(0, b"", b"", b"\x01\x02")
    cases["algo 2 rejected"] = legacy_trailer(1, b"s", b"k", b"x", algo=2)
    cases["hash 9 rejected"] = legacy_trailer(1, b"s", b"k", b"x", hash_id=9)
    cases["id type 3 rejected"] = b"s" + b"k" + b"x" + TRAILER.pack(1, 2, 3, 1, 1, 1) + SIG_MAGIC
    cases["sig_len 0 rejected"] = b"s" + b"k" + TRAILER.pack(1, 2, 1, 1, 1, 0) + SIG_MAGIC
    cases["sizes past the start rejected"] = TRAILER.pack(1, 2, 1, 255, 255, 0xFFFFFFFF) + SIG_MAGIC
    cases["PKCS#7 with non-zero algo and hash bytes"] = pkcs7_trailer(signed_data(signer_info()), algo=1, hash_id=8)
    return cases


def crafted_cases() -> Dict[str, bytes]:
    """Every crafted trailer, by label (PKCS#7 cases are wrapped in a trailer)."""
    pkcs7 = {**_digest_cases(), **_issuer_cases(), **_serial_cases(), **_ber_cases()}
    return {**{label: pkcs7_trailer(blob) for label, blob in pkcs7.items()}, **_legacy_cases()}


@pytest.mark.oracle
def test_crafted_trailers_match_modinfo(unsigned_image: bytes, tmp_path: Path) -> None:
    cases = crafted_cases()
    cases.update({f"cryptography {label}": pkcs7_trailer(blob) for label, blob in _with_cryptography().items()})
    labels = list(cases)
    images = [unsigned_image + cases[label] for label in labels]
    assert compare_with_modinfo(images, tmp_path, labels) == []
    # The cases do reach both outcomes, and read_signature agrees with the problem report.
    accepted = [label for label, image in zip(labels, images) if read_signature(image) is not None]
    rejected = [label for label in labels if label not in accepted]
    assert len(accepted) > 40 and len(rejected) > 25
    assert all("rejected" in label or label.startswith("digest") for label in rejected), rejected
    for label, image in zip(labels, images):
        assert (signature_problem(image) is None) == (label in accepted), label


def test_crafted_values(unsigned_image: bytes) -> None:
    """What the crafted cases read as, spelled out (independent of modinfo)."""
    cases = crafted_cases()

    def read(label: str) -> ModuleSignature:
        sig = read_signature(unsigned_image + cases[label])
        assert sig is not None, label
        return sig

    assert read("digest rmd160").hash_algo == "rmd160"
    assert read("digest sm3").sig_hashalgo == "sm3"
    assert read_signature(unsigned_image + cases["digest sha3-256"]) is None
    assert read("issuer without commonName uses its last entry").signer == "DE"
    assert read("issuer without entries").signer == ""
    assert read("first commonName wins").signer == "First"
    assert read("commonName with a NUL").signer == "ab"
    assert read("BMPString commonName").signer == ""  # UCS-2 starts with a NUL byte
    assert read("UTF-8 commonName").signer == "Schlüssel"
    assert read("SEQUENCE value prints its encoding").signer == "0\x03\x02\x01\x01"
    assert read("constructed UTF8String").signer == "abcd"
    assert read("serial zero").key_id == b""
    assert read("serial negative").key_id == b"\xff"
    assert read("serial leading zero byte").key_id == b"\x80"
    assert read("serial minus 256").key_id == b"\x01\x00"
    assert read("constructed OCTET STRING signature").signature == b"\xaa\xaa\xaa\xbb\xbb"
    assert read("empty signature").signature == b""
    sig = read("definite DER")
    assert sig == ModuleSignature("PKCS#7", "Crafted signing key", b"\x5a\x17", "sha256", bytes(range(64)))
    assert sig.algorithm is None
    assert read("indefinite lengths") == sig
    assert read("bytes after the message are ignored") == sig
    assert read("PGP legacy, DSA") == ModuleSignature(
        "PGP", "PGP signer <pgp@example.org>", b"\x12\x34\x56\x78" * 2, "sha256", b"\x99" * 40, "DSA"
    )
    assert read("legacy signer with a NUL").signer == "ab"
    assert read("legacy signer with a high byte").signer == "Schl\udcfcssel"
    assert [read(f"X509 legacy hash {i}").hash_algo for i in range(9)] == [
        "md4",
        "md5",
        "sha1",
        "rmd160",
        "sha256",
        "sha384",
        "sha512",
        "sha224",
        "sm3",
    ]


def test_problems_are_reported(unsigned_image: bytes) -> None:
    cases = crafted_cases()
    expectations = {
        "digest sha3-256": "digest algorithm 2.16.840.1.101.3.4.2.8 is not one kmod 30 knows",
        "no SignerInfo rejected": "no SignerInfo",
        "unknown content type rejected": "content type 1.2.840.113549.1.7.9, not SignedData",
        "SignedData without content rejected": "has no content",
        "algo 2 rejected": "unknown algorithm 2",
        "sig_len 0 rejected": "zero signature length",
        "sizes past the start rejected": "only",
        "invalid UTF-8 rejected": "PKCS#7 signature is malformed: name entry",
        "14 nested SignedData rejected (nesting limit)": "nested too deep",
        "serial non-minimal rejected": "not minimally encoded",
    }
    for label, expected in expectations.items():
        problem = signature_problem(unsigned_image + cases[label], "/lib/modules/x.ko")
        assert problem is not None and expected in problem, (label, problem)
        with pytest.raises(SignatureProblem) as info:
            parse_signature(unsigned_image + cases[label], "/lib/modules/x.ko")
        assert isinstance(info.value, ModuleFormatError)
        assert info.value.path == "/lib/modules/x.ko"
        assert info.value.problem == problem
    assert signature_problem(SIG_MAGIC) == "signature trailer is truncated: 0 bytes before the magic string"


# --- malformed input: never an unexpected exception -------------------------------------------


def _never_raises(image: bytes) -> Optional[ModuleSignature]:
    try:
        parsed = parse_signature(image)
    except SignatureProblem:
        parsed = None
    assert read_signature(image) == parsed
    return parsed


def test_every_truncation_of_the_trailer_region(signed_image: bytes) -> None:
    region = len(real_pkcs7(signed_image)) + 40 + 64
    for cut in range(len(signed_image) - region, len(signed_image) + 1):
        sig = _never_raises(signed_image[:cut])
        assert (sig is not None) == (cut == len(signed_image))


@pytest.mark.oracle
def test_every_truncation_of_the_pkcs7(signed_image: bytes, unsigned_image: bytes, tmp_path: Path) -> None:
    blob = real_pkcs7(signed_image)
    images = [
        unsigned_image + pkcs7_trailer(blob[:cut]) if cut else unsigned_image + pkcs7_trailer(b"")
        for cut in range(len(blob) + 1)
    ]
    for image in images:
        _never_raises(image)
    assert compare_with_modinfo(images, tmp_path) == []


def _mutate(blob: bytes, rng: random.Random) -> bytes:
    data = bytearray(blob)
    choice = rng.randrange(5)
    if choice == 0:
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif choice == 1:  # headers live in the first ~170 bytes of a module signature
        data[rng.randrange(min(len(data), 200))] = rng.choice([0, 1, 0x1F, 0x30, 0x31, 0x7F, 0x80, 0x81, 0x84, 0xFF])
    elif choice == 2:
        del data[rng.randrange(len(data))]
    elif choice == 3:
        data.insert(rng.randrange(len(data)), rng.randrange(256))
    else:
        for _ in range(rng.randrange(2, 10)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


@pytest.mark.oracle
def test_seeded_mutations_match_modinfo(signed_image: bytes, unsigned_image: bytes, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    seeds = [real_pkcs7(signed_image), *(blob for label, blob in _ber_cases().items() if "rejected" not in label)]
    images = []
    for _ in range(3000):
        blob = _mutate(rng.choice(seeds), rng)
        images.append(unsigned_image + pkcs7_trailer(blob))
    problems = compare_with_modinfo(images, tmp_path)
    assert problems == []
    accepted = sum(read_signature(image) is not None for image in images)
    assert 300 < accepted < 2700  # both outcomes are exercised


def test_random_trailers_never_raise(unsigned_image: bytes) -> None:
    rng = random.Random(SEED + 1)
    tail = unsigned_image[-4096:]
    for _ in range(3000):
        size = rng.choice([0, 1, 11, 12, 13, 40, 200, 700])
        junk = bytes(rng.randrange(256) for _ in range(size))
        header = TRAILER.pack(
            rng.randrange(3),
            rng.randrange(10),
            rng.randrange(4),
            rng.randrange(256),
            rng.randrange(256),
            rng.choice([0, 1, size, size + 1, rng.randrange(1 << 32)]),
        )
        _never_raises(tail + junk + header[rng.randrange(13) :] + SIG_MAGIC)
        _never_raises(tail + pkcs7_trailer(junk))


# --- the DER reader on hostile input -----------------------------------------------------------


@pytest.mark.parametrize(
    "blob",
    [
        b"\x30\x84\xff\xff\xff\xff",  # claims 4 GiB
        b"\x30\x88\x7f\xff\xff\xff\xff\xff\xff\xff" + b"\0" * 16,  # header longer than asn1_d2i_read_bio's 8 bytes
        b"\x30\x89\x01" + b"\0" * 8,  # length needs more than 8 bytes
        b"\x30\x80" * 5000,  # deep indefinite nesting without an end
        b"\x1f\xff\xff\xff\xff\x7f\x00",  # tag number beyond INT_MAX
        b"\x04\x80\x00\x00",  # indefinite primitive
        b"\x30",
        b"",
    ],
)
def test_der_rejects_hostile_headers(blob: bytes) -> None:
    with pytest.raises(der.DerError):
        der.d2i_pkcs7_bio(blob)


def test_der_limits_hold_without_recursion_errors() -> None:
    # 10,000 nested indefinite SEQUENCEs inside an ANY: asn1_find_end is iterative.
    deep_any = b"\x30\x80" * 10000 + b"\x00\x00" * 10000
    message = seq(oid("1.2.3"), tlv(0xA0, deep_any, form="indefinite"))
    root = der.d2i_pkcs7_bio(message)
    assert isinstance(root.fields["d"], der.Value)
    # Pieces of a constructed string nest at most 5 deep (ASN1_MAX_STRING_NEST) below the string.
    for depth in range(1, 9):
        blob = signed_data(signer_info(signature=nested_string(depth)))
        assert (read_signature(pkcs7_trailer(blob)) is not None) == (depth <= 6), depth
    # A SET OF with 20,000 elements decodes in linear time.
    many = signed_data(signer_info(unauth=tlv(0xA1, *[seq(oid("1.2.3"), set_of(NULL))] * 20000)))
    started = time.perf_counter()
    assert read_signature(pkcs7_trailer(many)) is not None
    assert time.perf_counter() - started < 10


def test_get_object_follows_openssl() -> None:
    header, too_long = der.get_object(b"\x30\x81\x05" + b"\0" * 5, 0, 8)
    assert (header.content, header.length, too_long) == (3, 5, False)
    # A long-form length's bytes must all be there (OpenSSL 3.0.22; 3.0.19 wanted one more after them).
    assert der.get_object(b"\x04\x81\x00", 0, 3)[0].length == 0
    with pytest.raises(der.DerError):
        der.get_object(b"\x04\x82\x00", 0, 3)
    assert der.get_object(b"\x04\x00", 0, 2)[0].length == 0
    # Leading zero length bytes are skipped, a high-tag-number form for a low tag is accepted.
    assert der.get_object(b"\x04\x89" + b"\0" * 8 + b"\x01" + b"x", 0, 12)[0].length == 1
    assert der.get_object(b"\x1f\x02\x01\x07", 0, 4)[0].tag == 2
    _header, too_long = der.get_object(b"\x04\x05abc", 0, 5)
    assert too_long
    assert der.read_bio_extent(b"\x30\x80\x04\x01x\x00\x00trailing") == 7


def test_problem_messages_stay_small_for_absurd_oids() -> None:
    huge = tlv(0x06, b"\x2a" + b"\xff" * 3000 + b"\x01")  # one arc of ~21,000 bits
    info = seq(
        integer(b"\x01"),
        seq(name((CN, 0x0C, b"K")), integer(b"\x05")),
        seq(huge, NULL),
        seq(oid(RSA), NULL),
        octets(b"x"),
    )
    for blob in (signed_data(info), seq(huge, tlv(0xA0, seq(integer(b"\x01"))))):
        problem = signature_problem(pkcs7_trailer(blob))
        assert problem is not None and "(3002-byte OID)" in problem and len(problem) < 200
    assert der.oid_text(bytes.fromhex("2a864886f70d010702")) == "1.2.840.113549.1.7.2"
