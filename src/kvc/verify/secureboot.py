"""``kvc verify --secure-boot``: the firmware side of a Secure Boot guest.

PVH has no EFI, so this mode boots the bzImage through OVMF (Debian's ``ovmf`` package) with
Secure Boot on and SMM, and the instance's certificate enrolled as a MOK by the MokListRT route:
an OVMF variable store with our own PK and KEK, Debian's CA in ``db`` and the certificate in a
``MokListRT`` variable, which Debian's kernels read when Secure Boot is on and put in the
``.machine`` keyring (see the README's Secure Boot section). Secure Boot then turns on lockdown
and signature enforcement by itself.

The variable store is made with ``virt-fw-vars`` (PyPI ``virt-firmware``): enrolling PK, KEK and
db means authenticated variables in edk2's firmware-volume layout, and the distribution CAs it
ships; kvc writes only the ``MokListRT`` payload (one EFI_SIGNATURE_LIST). The store is made once
per certificate into the cache and copied fresh for every boot (the firmware writes to it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import shutil
import struct
import sys
import uuid
from dataclasses import dataclass
from typing import Optional

from kvc import proc
from kvc.atomic import write_file
from kvc.errors import ConfigError, MissingProgramError

OVMF_DIR = "/usr/share/OVMF"
OVMF_SECURE_CODE = f"{OVMF_DIR}/OVMF_CODE_4M.secboot.fd"
OVMF_VARS_TEMPLATE = f"{OVMF_DIR}/OVMF_VARS_4M.fd"
VIRT_FW_VARS = "virt-fw-vars"
OVMF_HINT = "install OVMF: 'apt-get install ovmf' (Debian) or 'dnf install edk2-ovmf' (Fedora)"
VIRT_FW_VARS_HINT = "install virt-firmware: 'pip install virt-firmware' (it provides virt-fw-vars)"
SHIM_LOCK_GUID = "605dab50-e046-4300-abb6-3dd810dd8b23"  # shim's vendor GUID: MokList, MokListRT
EFI_CERT_X509_GUID = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
KVC_OWNER_GUID = uuid.UUID("6b76632d-7365-6375-7265-2d626f6f7421")  # the enrolled entry's owner (kvc's own)
_EFI_VARIABLE_NON_VOLATILE_BOOTSERVICE_RUNTIME = 7
_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"


@dataclass(frozen=True)
class Certificate:
    """The certificate to enroll: its DER bytes and the name the kernel gives its key
    (``/proc/keys`` and "Loaded X.509 cert" say ``NAME: KEYID``)."""

    path: str
    der: bytes
    name: str
    key_id: str

    @property
    def description(self) -> str:
        return f"{self.name}: {self.key_id}"


def _der_of(path: str, data: bytes) -> bytes:
    start = data.find(_PEM_BEGIN)
    if start < 0:
        return data
    end = data.find(_PEM_END, start)
    if end < 0:
        raise ConfigError(f"{path}: a PEM certificate without its END line", hint="give the whole PEM or DER file")
    try:
        return base64.b64decode(b"".join(data[start + len(_PEM_BEGIN) : end].split()), validate=True)
    except binascii.Error:
        raise ConfigError(f"{path}: the PEM certificate is not valid base64") from None


def _kernel_name(subject: dict[str, str]) -> str:
    """The name the kernel fabricates for a certificate's subject (x509_fabricate_name): the CN,
    prefixed by the O when the CN does not start with it."""
    common, organization = subject.get("CN", ""), subject.get("O", "")
    if common and organization:
        return common if common.startswith(organization) else f"{organization}: {common}"
    return common or organization or subject.get("emailAddress", "")


def read_certificate(path: str) -> Certificate:
    """The X.509 certificate at ``path`` (PEM or DER), with the kernel's name for its key."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the certificate {path}: {exc.strerror}",
            hint="check the path given with --sb-cert (or KVC_SIGN_CERT in the conf)",
        ) from None
    der = _der_of(path, data)
    try:
        from cryptography import x509
    except ImportError:
        raise MissingProgramError(
            "reading the certificate needs the Python package cryptography",
            hint="install it: 'apt-get install python3-cryptography' or 'pip install cryptography'",
        ) from None
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise ConfigError(f"{path} is not an X.509 certificate (PEM or DER): {exc}") from None
    subject = {attribute.rfc4514_attribute_name: str(attribute.value) for attribute in cert.subject}
    try:
        key_id = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    except x509.ExtensionNotFound:
        raise ConfigError(
            f"{path} has no subjectKeyIdentifier: the kernel names module signers by it",
            hint="make the certificate with 'kvc keys generate' or openssl req -x509 (which adds it)",
        ) from None
    return Certificate(path, der, _kernel_name(subject), key_id)


def mok_signature_list(der: bytes, owner: uuid.UUID = KVC_OWNER_GUID) -> bytes:
    """One EFI_SIGNATURE_LIST of type X.509 holding ``der`` (UEFI spec 32.4.1)."""
    size = 16 + len(der)
    return EFI_CERT_X509_GUID.bytes_le + struct.pack("<III", 28 + size, 0, size) + owner.bytes_le + der


def find_firmware() -> tuple[str, str]:
    """OVMF's Secure Boot code and its empty variable store."""
    for path in (OVMF_SECURE_CODE, OVMF_VARS_TEMPLATE):
        if not os.path.isfile(path):
            raise MissingProgramError(f"--secure-boot needs OVMF: {path} is missing", hint=OVMF_HINT)
    return OVMF_SECURE_CODE, OVMF_VARS_TEMPLATE


def find_virt_fw_vars() -> str:
    """virt-fw-vars on PATH, else beside this Python (a virtualenv's bin)."""
    found = shutil.which(VIRT_FW_VARS) or shutil.which(VIRT_FW_VARS, path=os.path.dirname(sys.executable))
    if found is None:
        raise MissingProgramError(f"--secure-boot needs {VIRT_FW_VARS}, which is not installed", hint=VIRT_FW_VARS_HINT)
    return found


def enrolled_vars(cert: Certificate, cache_dir: str) -> str:
    """The variable store with Secure Boot on and ``cert`` in MokListRT (made once into the
    cache; boot a copy)."""
    _, template = find_firmware()
    info = os.stat(template)
    key = hashlib.sha256(cert.der + f"{template}:{info.st_size}:{info.st_mtime_ns}".encode()).hexdigest()[:24]
    target = os.path.join(cache_dir, "ovmf", f"{key}.mok.fd")
    if os.path.isfile(target):
        return target
    mok = {
        "version": 2,
        "variables": [
            {
                "name": "MokListRT",
                "guid": SHIM_LOCK_GUID,
                "attr": _EFI_VARIABLE_NON_VOLATILE_BOOTSERVICE_RUNTIME,
                "data": mok_signature_list(cert.der).hex(),
            }
        ],
    }
    mok_json = f"{target}.json.{os.getpid()}"
    made = f"{target}.tmp.{os.getpid()}"
    write_file(mok_json, json.dumps(mok))
    try:
        proc.run(
            [
                find_virt_fw_vars(),
                "--input",
                template,
                "--enroll-generate",
                "kvc verify PK",
                "--no-microsoft",
                "--distro-keys",
                "debian",
                "--set-json",
                mok_json,
                "--sb",
                "--output",
                made,
            ],
            hint=VIRT_FW_VARS_HINT,
        )
        os.replace(made, target)
    finally:
        for path in (mok_json, made):
            if os.path.exists(path):
                os.unlink(path)
    return target


def boot_copy(template: str, destination: str) -> str:
    shutil.copyfile(template, destination)
    return destination


def certificate_path(option: Optional[str], configured: Optional[str], instance: str) -> str:
    """``--sb-cert``, else ``configured`` (the instance's KVC_SIGN_CERT)."""
    path = option or configured
    if not path:
        raise ConfigError(
            f"--secure-boot needs the certificate to enroll for instance {instance}",
            hint="give it with --sb-cert CERT (PEM or DER), or set KVC_SIGN_CERT in the instance's conf",
        )
    return os.path.abspath(path)
