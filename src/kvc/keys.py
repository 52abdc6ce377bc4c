"""Module-signing keys and the host's trust in them.

``generate`` makes a MOK-style RSA key and self-signed certificate: the extensions of the
kernel's ``certs/default_x509.genkey`` plus extendedKeyUsage codeSigning, which SUSE's kernel patches
look for on module keys. Red Hat's module-signing usage (1.3.6.1.4.1.2312.16.1.2) is left out:
SUSE's EKU parser (x509_process_extension) refuses, as a malformed certificate, any usage OID not
8 bytes long, and that one is 10; mainline ignores extendedKeyUsage.
``host_trust`` reads what decides whether the running kernel accepts a module signature:
lockdown, ``sig_enforce``, Secure Boot (efivars) and the keys in the trusted keyrings.

Keyring membership on a real host is read with ``keyctl(KEYCTL_READ)`` through ctypes: one
syscall, so no dependency on the ``keyutils`` package being installed. Under ``KVC_ROOT`` the
members come from a fake file, ``proc/kvc-keyring-members`` (one line per keyring:
``KEYRING_SERIAL_HEX: MEMBER_SERIAL_HEX ...``), which tests write beside their fake
``proc/keys``."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from kvc.atomic import write_file
from kvc.errors import ConfigError, HostFileError, KvcError, LoadError
from kvc.kmod.paths import HostPaths
from kvc.kmod.signature import ModuleSignature

KEY_FILE = "kvc-signing.key"
PEM_FILE = "kvc-signing.pem"
DER_FILE = "kvc-signing.der"
TRUST_KEYRINGS = (".builtin_trusted_keys", ".secondary_trusted_keys", ".machine", ".platform")
EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
SHIM_LOCK = "605dab50-e046-4300-abb6-3dd810dd8b23"
FAKE_MEMBERS = "/proc/kvc-keyring-members"
ENROLL_STEPS = (
    "mokutil --import kvc-signing.der (choose a one-time password), reboot, "
    "then in MokManager: Enroll MOK, Continue, Yes, the password, Reboot"
)

_KEYCTL_READ = 11
_KEYCTL_SYSCALLS = {"x86_64": 250, "aarch64": 219, "ppc64le": 280, "s390x": 280}


@dataclass(frozen=True)
class GeneratedKey:
    key_path: str
    pem_path: str
    der_path: str
    key_id: str  # the subject key identifier, lowercase hex, as the kernel prints it
    description: str  # "CN: keyid", as /proc/keys and "Loaded X.509 cert" show it


def _cryptography() -> Any:
    try:
        import cryptography.x509 as x509
    except ImportError:
        raise ConfigError(
            "generating a key needs the Python package 'cryptography', which is not installed",
            hint="install kvc[sign] (pip) or python3-cryptography (Debian, RHEL)",
        ) from None
    return x509


def generate(out_dir: str, common_name: str, bits: int = 2048, days: int = 3650) -> GeneratedKey:
    """Write a new key (0600) and its certificate (PEM, and DER for ``mokutil --import``) into
    ``out_dir``; refuses when any of the three files exists."""
    if bits not in (2048, 3072, 4096):
        raise ConfigError(f"--bits {bits}: not a supported RSA size", hint="use 2048, 3072 or 4096")
    if days < 1:
        raise ConfigError(f"--days {days}: must be at least 1", hint="give the certificate's lifetime in days")
    if not common_name.strip():
        raise ConfigError("--cn is empty", hint="name the key, e.g. --cn 'kvc signing key for host1'")
    paths = [os.path.join(out_dir, name) for name in (KEY_FILE, PEM_FILE, DER_FILE)]
    existing = [path for path in paths if os.path.lexists(path)]
    if existing:
        raise ConfigError(
            f"{existing[0]} exists: kvc never overwrites a key or certificate",
            hint="choose another --out directory, or move the old files away yourself",
        )
    if not os.path.isdir(out_dir):
        raise HostFileError(f"{out_dir}: not a directory", hint="create it first, or choose another --out")
    x509 = _cryptography()
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    skid = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]),
            critical=False,
        )
        .add_extension(skid, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(skid), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_file(paths[0], key_pem, 0o600)
    write_file(paths[1], certificate.public_bytes(serialization.Encoding.PEM))
    write_file(paths[2], certificate.public_bytes(serialization.Encoding.DER))
    key_id = skid.digest.hex()
    return GeneratedKey(paths[0], paths[1], paths[2], key_id, f"{common_name}: {key_id}")


@dataclass(frozen=True)
class TrustedKey:
    serial: int
    description: str  # "CN: keyid"

    @property
    def signer(self) -> str:
        return self.description.rpartition(": ")[0]

    @property
    def key_id(self) -> str:
        return self.description.rpartition(": ")[2].lower()


@dataclass(frozen=True)
class HostTrust:
    lockdown: Optional[str]  # none, integrity, confidentiality; None: no lockdown LSM
    sig_enforce: Optional[bool]
    secure_boot: Optional[bool]  # None: no efivars
    setup_mode: Optional[bool]
    mok_validation_disabled: Optional[bool]  # MokSBStateRT: shim told not to validate
    keyrings: Mapping[str, tuple[TrustedKey, ...]] = field(default_factory=dict)

    @property
    def enforcing(self) -> bool:
        """Whether the kernel refuses a module without a trusted signature (sig_enforce, or
        lockdown refusing unsigned loads: kernel/module/signing.c)."""
        return bool(self.sig_enforce) or self.lockdown in ("integrity", "confidentiality")

    def keyrings_holding(self, key_id: str, signer: str = "") -> list[str]:
        """The trusted keyrings with a key of this id. /proc/keys shows a key by its subject key
        identifier; a signature naming the key by issuer and serial (sign-file's default) can only
        be matched by the signer's name."""
        wanted = key_id.replace(":", "").lower()
        return [
            ring
            for ring, keys in self.keyrings.items()
            if any(key.key_id == wanted or (signer and key.signer == signer) for key in keys)
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "lockdown": self.lockdown,
            "sig_enforce": self.sig_enforce,
            "secure_boot": self.secure_boot,
            "setup_mode": self.setup_mode,
            "mok_validation_disabled": self.mok_validation_disabled,
            "enforcing": self.enforcing,
            "keyrings": {ring: [key.description for key in keys] for ring, keys in self.keyrings.items()},
        }


def _read(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def _efi_flag(paths: HostPaths, name: str, guid: str) -> Optional[bool]:
    """An efivarfs boolean: 4 attribute bytes, then the value."""
    data = _read(paths.host(f"/sys/firmware/efi/efivars/{name}-{guid}"))
    if data is None or len(data) < 5:
        return None
    return data[4] != 0


def _proc_keys(paths: HostPaths) -> dict[int, tuple[str, str]]:
    """serial -> (type, description) from /proc/keys (security/keys/proc.c: serial flags usage
    timeout perm uid gid type description[: summary]). An asymmetric key shows ``CN: keyid``
    and then, after a space, its subtype and algorithm summary."""
    # The type is printed "%-9.9s": an asymmetric key shows as "asymmetri".
    keys = {}
    text = (_read(os.path.join(paths.proc, "keys")) or b"").decode("utf-8", "replace")
    for line in text.splitlines():
        fields = line.split(None, 8)
        if len(fields) == 9:
            with contextlib.suppress(ValueError):
                keys[int(fields[0], 16)] = (fields[7], fields[8].strip())
    return keys


def _members_fake(paths: HostPaths) -> dict[int, list[int]]:
    members: dict[int, list[int]] = {}
    text = (_read(paths.host(FAKE_MEMBERS)) or b"").decode("utf-8", "replace")
    for line in text.splitlines():
        ring, _, rest = line.partition(":")
        with contextlib.suppress(ValueError):
            members[int(ring, 16)] = [int(word, 16) for word in rest.split()]
    return members


def _members_live(serial: int) -> list[int]:
    """keyctl(KEYCTL_READ, keyring): the serials it links, as 32-bit host-endian integers."""
    import ctypes
    import sys

    number = _KEYCTL_SYSCALLS.get(os.uname().machine)
    if number is None:
        return []
    libc = ctypes.CDLL(None, use_errno=True)
    size = 4096
    buffer = ctypes.create_string_buffer(size)
    got = libc.syscall(ctypes.c_long(number), _KEYCTL_READ, ctypes.c_int32(serial), buffer, ctypes.c_size_t(size))
    if got < 0:
        return []
    count = min(got, size) // 4
    return [int.from_bytes(buffer.raw[i * 4 : i * 4 + 4], sys.byteorder, signed=True) for i in range(count)]


def _key_description(described: str) -> str:
    """``CN: keyid X509.rsa hash []`` -> ``CN: keyid``: the summary follows the last ": id"."""
    name, sep, rest = described.rpartition(": ")
    return f"{name}{sep}{rest.split()[0]}" if sep and rest.split() else described


def host_trust(paths: HostPaths) -> HostTrust:
    lockdown_text = (_read(paths.host("/sys/kernel/security/lockdown")) or b"").decode("utf-8", "replace")
    lockdown = next((word[1:-1] for word in lockdown_text.split() if word.startswith("[")), None)
    enforce_text = (_read(os.path.join(paths.sys_module, "module/parameters/sig_enforce")) or b"").decode().strip()
    keys = _proc_keys(paths)
    fake = paths.root not in ("", "/")
    fake_members = _members_fake(paths) if fake else {}
    keyrings: dict[str, tuple[TrustedKey, ...]] = {}
    for serial, (type_name, description) in sorted(keys.items()):
        ring = description.split(":", 1)[0]
        if type_name != "keyring" or ring not in TRUST_KEYRINGS:
            continue
        members = fake_members.get(serial, []) if fake else _members_live(serial)
        keyrings[ring] = tuple(
            TrustedKey(member, _key_description(keys[member][1]))
            for member in members
            if member in keys and keys[member][0] == "asymmetri"
        )
    return HostTrust(
        lockdown=lockdown,
        sig_enforce={"Y": True, "N": False}.get(enforce_text),
        secure_boot=_efi_flag(paths, "SecureBoot", EFI_GLOBAL),
        setup_mode=_efi_flag(paths, "SetupMode", EFI_GLOBAL),
        mok_validation_disabled=_efi_flag(paths, "MokSBStateRT", SHIM_LOCK),
        keyrings=dict(sorted(keyrings.items(), key=lambda item: TRUST_KEYRINGS.index(item[0]))),
    )


def signature_problem(module_name: str, signature: Optional[ModuleSignature], trust: HostTrust) -> Optional[str]:
    """Why the host's kernel will refuse this module's signature, or None. Unsigned on a kernel
    that does not enforce is allowed (the kernel taints E); a signature is judged only when the
    trusted keyrings could be read."""
    if signature is None:
        if not trust.enforcing:
            return None
        return f"{module_name}: unsigned, and the kernel enforces signatures ({_enforcement(trust)})"
    if not trust.keyrings or not any(trust.keyrings.values()):
        return None
    if trust.keyrings_holding(signature.key_id.hex(), signature.signer):
        return None
    if not trust.enforcing:
        return None
    return (
        f"{module_name}: signed by {signature.signer or '?'} (key {signature.key_id.hex()}), "
        f"which none of the kernel's trusted keyrings holds ({_enforcement(trust)})"
    )


def module_verdicts(modules: Mapping[str, Optional[ModuleSignature]], trust: HostTrust) -> list[dict[str, Any]]:
    """Per module: its signer and key id, the trusted keyrings holding that key, and whether the
    running kernel will take it."""
    verdicts = []
    for name, signature in modules.items():
        problem = signature_problem(name, signature, trust)
        verdicts.append(
            {
                "module": name,
                "signer": signature.signer if signature is not None else None,
                "sig_key": signature.key_id.hex() if signature is not None else None,
                "keyrings": trust.keyrings_holding(signature.key_id.hex(), signature.signer) if signature else [],
                "accepted": problem is None,
                "problem": problem,
            }
        )
    return verdicts


def _enforcement(trust: HostTrust) -> str:
    reasons = []
    if trust.sig_enforce:
        reasons.append("sig_enforce=Y")
    if trust.lockdown in ("integrity", "confidentiality"):
        reasons.append(f"lockdown={trust.lockdown}")
    return ", ".join(reasons)


ENROLL_HINT = (
    "sign the modules with an enrolled key (KVC_SIGN_KEY/KVC_SIGN_CERT), or enroll the signing key: "
    "'kvc keys generate', then " + ENROLL_STEPS + "; 'kvc keys status' shows the trusted keys"
)


def check_signatures(modules: Mapping[str, Optional[ModuleSignature]], trust: HostTrust) -> list[str]:
    """The refusals for the modules (name -> signature), in order."""
    return [problem for name, sig in modules.items() if (problem := signature_problem(name, sig, trust)) is not None]


def unsigned_warnings(modules: Mapping[str, Optional[ModuleSignature]], trust: HostTrust) -> list[str]:
    if trust.sig_enforce is not False or trust.enforcing:
        return []
    return [
        f"{name}: unsigned; the kernel will load it and taint itself 'E' (unsigned module)"
        for name, sig in modules.items()
        if sig is None
    ]


def trust_error(problems: list[str]) -> KvcError:
    return LoadError("the kernel will refuse these modules' signatures", details="\n".join(problems), hint=ENROLL_HINT)
